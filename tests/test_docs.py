"""Every setting is documented where users look: the README table and the config examples."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from gateway.settings import GatewaySettings
from upstream.settings import UpstreamSettings

ROOT = Path(__file__).resolve().parent.parent


def variables(settings: type[BaseSettings]) -> list[str]:
    return [name.upper() for name in settings.model_fields]


@pytest.mark.parametrize(
    ("settings", "example"),
    [(GatewaySettings, "gateway.env.example"), (UpstreamSettings, "upstream.env.example")],
)
def test_examples_list_every_variable_and_validate(
    settings: type[BaseSettings], example: str, clean_env: pytest.MonkeyPatch
) -> None:
    path = ROOT / "config" / example
    text = path.read_text()
    mentioned = set(re.findall(r"^#?([A-Z][A-Z0-9_]+)=", text, re.MULTILINE))
    assert set(variables(settings)) - mentioned == set()
    assert mentioned - set(variables(settings)) == set()
    clean_env.setenv("OPENAI_API_KEY", "sk-example")
    settings(_env_file=path)  # the example as shipped is a valid configuration


@pytest.mark.parametrize("settings", [GatewaySettings, UpstreamSettings])
def test_readme_documents_every_variable(settings: type[BaseSettings]) -> None:
    readme = (ROOT / "README.md").read_text()
    rows = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", readme, re.MULTILINE))
    assert set(variables(settings)) - rows == set()
