"""Every setting is documented where users look: docs/configuration.md (generated from the
settings classes, never stale) and the config examples; the docs' relative links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from devtools import configdoc
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
def test_configuration_reference_documents_every_variable(settings: type[BaseSettings]) -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    rows = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", text, re.MULTILINE))
    assert set(variables(settings)) - rows == set()
    for name, field in settings.model_fields.items():
        assert field.description, f"{name.upper()} has no docstring: its meaning in the docs"


def test_configuration_reference_is_generated_from_the_settings() -> None:
    """docs/configuration.md is what `python -m devtools.configdoc` makes of the classes now."""
    current = configdoc.DOC.read_text()
    assert configdoc.render(current) == current, "stale: run python -m devtools.configdoc"


def test_relative_links_in_the_docs_resolve() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []
