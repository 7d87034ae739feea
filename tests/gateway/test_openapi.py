"""The merged OpenAPI document and /docs, against the real chat service behind the gateway."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import uuid
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate

from gateway.keys import lifecycle_key
from gateway.limiting.policies import parse_policies
from gateway.openapi import merge, ratelimit_of
from tests.conftest import GatewayStarter
from tests.gateway.conftest import FakeUpstream, GatewayFactory
from tests.gateway.limiting.test_ratelimit import parse_list, policy_file, user
from upstream.app import create_app as create_upstream
from upstream.settings import UpstreamSettings

ROOT = Path(__file__).resolve().parents[2]
OPERATIONS = {  # every operation of the chat service
    ("post", "/v1/chat"),
    ("get", "/v1/conversations"),
    ("get", "/v1/conversations/{id}"),
    ("delete", "/v1/conversations/{id}"),
    ("get", "/healthz"),
    ("get", "/readyz"),
}

POLICIES = """
[default]
rate = "100/minute"
burst = 100

[ip]
rate = "600/minute"
burst = 600

[[rules]]
name = "chat"
methods = ["POST"]
path_prefix = "/v1/chat"
rate = "20/minute"
burst = 5

[[rules]]
name = "reads"
methods = ["GET"]
path_prefix = "/v1/conversations"
rate = "2/second"
burst = 30
"""


async def get_json(client: TestClient[Any, Any], path: str) -> Any:
    resp = await client.get(path)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def test_upstream_documents_every_route(aiohttp_client: Any, database_url: str) -> None:
    settings = UpstreamSettings(
        _env_file=None, database_url=database_url, upstream_llm_provider="local"
    )
    client = await aiohttp_client(create_upstream(settings))
    doc = await get_json(client, "/openapi.json")
    validate(doc)
    assert doc["openapi"].startswith("3.")
    found = {(m, p) for p, item in doc["paths"].items() for m in item}
    assert found == OPERATIONS
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            assert operation["summary"] and operation["description"], (method, path)
    # every field of every schema is described, with an example
    for name, schema in doc["components"]["schemas"].items():
        for field, prop in schema.get("properties", {}).items():
            assert prop.get("description"), f"{name}.{field}"
            assert "example" in prop, f"{name}.{field}"
    chat = doc["paths"]["/v1/chat"]["post"]
    assert {"text/event-stream", "application/json"} <= set(chat["responses"]["200"]["content"])
    for event in ("event: delta", "event: done", "event: error"):
        assert event in chat["description"]
    assert {"400", "404", "502", "503", "504"} <= set(chat["responses"])


async def test_gateway_merges_annotates_and_validates(
    make_gateway: GatewayFactory, chat_service: str, tmp_path: Path
) -> None:
    path = policy_file(tmp_path, text=POLICIES)
    client = await make_gateway(
        chat_service, gateway_ratelimit_config=path, gateway_public_url="https://api.example.com"
    )
    doc = await get_json(client, "/openapi.json")
    validate(doc)
    assert doc["servers"] == [{"url": "https://api.example.com", "description": "the gateway"}]
    # the gateway's own operations, and every upstream operation with its summary
    assert {"/healthz", "/readyz", "/openapi.json"} <= set(doc["paths"])
    for method, route in OPERATIONS - {("get", "/healthz"), ("get", "/readyz")}:
        operation = doc["paths"][route][method]
        assert operation["summary"]
        assert operation["responses"]["429"] == {"$ref": "#/components/responses/QuotaExceeded"}
        assert {"502", "504"} <= set(operation["responses"])
        assert operation["x-ratelimit"]
        # X-User-Id: set by the gateway when absent, so optional here
        header = [p for p in operation["parameters"] if p["name"] == "X-User-Id"]
        assert header and header[0]["required"] is False
    quota = doc["components"]["responses"]["QuotaExceeded"]
    assert {"Retry-After", "RateLimit", "RateLimit-Policy"} <= set(quota["headers"])
    assert doc["components"]["schemas"]["QuotaExceeded"]["properties"]["type"]["enum"] == [
        "https://iana.org/assignments/http-problem-types#quota-exceeded"
    ]
    assert "/docs" not in doc["paths"] or doc["paths"]["/docs"]


async def test_x_ratelimit_is_what_the_limiter_applies(
    make_gateway: GatewayFactory, chat_service: str, tmp_path: Path
) -> None:
    client = await make_gateway(
        chat_service, gateway_ratelimit_config=policy_file(tmp_path, text=POLICIES)
    )
    doc = await get_json(client, "/openapi.json")
    checked = 0
    for route, item in doc["paths"].items():
        for method, operation in item.items():
            if "x-ratelimit" not in operation:
                continue
            concrete = route.replace("{id}", str(uuid.uuid4()))
            kwargs: dict[str, Any] = {"headers": user()}
            if method == "post":
                kwargs["json"] = {"message": "hi", "stream": False}
            resp = await client.request(method.upper(), concrete, **kwargs)
            await resp.read()
            applied = parse_list(resp.headers["RateLimit-Policy"])
            documented = {
                x["policy"]: {"q": x["burst"], "w": x["window"]} for x in operation["x-ratelimit"]
            }
            assert applied == documented, (method, route)
            checked += 1
    assert checked == 4
    # and what the document names for chat is the rule, for listing the `reads` rule
    assert doc["paths"]["/v1/chat"]["post"]["x-ratelimit"][0]["policy"] == "chat"
    assert doc["paths"]["/v1/conversations"]["get"]["x-ratelimit"][0]["policy"] == "reads"


async def test_reloaded_policies_show_up_and_the_last_copy_outlives_the_upstream(
    make_gateway: GatewayFactory, aiohttp_server: Any, database_url: str, tmp_path: Path
) -> None:
    settings = UpstreamSettings(
        _env_file=None, database_url=database_url, upstream_llm_provider="local"
    )
    server = await aiohttp_server(create_upstream(settings))
    path = policy_file(tmp_path, text=POLICIES)
    client = await make_gateway(str(server.make_url("")).rstrip("/"), gateway_ratelimit_config=path)
    doc = await get_json(client, "/openapi.json")
    assert doc["paths"]["/v1/chat"]["post"]["x-ratelimit"][0]["burst"] == 5
    path.write_text(POLICIES.replace("burst = 5", "burst = 9"))
    await client.app[lifecycle_key].reload()  # what SIGHUP runs
    doc = await get_json(client, "/openapi.json")
    assert doc["paths"]["/v1/chat"]["post"]["x-ratelimit"][0]["burst"] == 9
    await server.close()  # the upstream goes away: the gateway keeps its last good copy
    doc = await get_json(client, "/openapi.json")
    assert "/v1/chat" in doc["paths"]


async def test_an_upstream_down_at_boot_is_no_reason_to_fail(
    make_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    client = await make_gateway("http://127.0.0.1:9")  # nothing listens there
    doc = await get_json(client, "/openapi.json")
    validate(doc)
    assert set(doc["paths"]) == {"/healthz", "/readyz", "/openapi.json"}


def test_merge_jwt_mode_and_conflicts(caplog: pytest.LogCaptureFixture) -> None:
    policies = parse_policies(POLICIES, "t.toml")
    upstream = {
        "openapi": "3.0.3",
        "info": {"title": "u", "version": "1"},
        "paths": {
            "/healthz": {"get": {"summary": "theirs", "responses": {"200": {"description": "x"}}}},
            "/v1/chat": {
                "post": {
                    "summary": "chat",
                    "parameters": [
                        {
                            "in": "header",
                            "name": "X-User-Id",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "requestBody": {"content": {"application/json": {"schema": {}}}},
                    "responses": {"200": {"description": "ok"}},
                }
            },
        },
    }
    own = {
        "openapi": "3.0.3",
        "info": {"title": "g", "version": "1"},
        "paths": {
            "/healthz": {"get": {"summary": "ours", "responses": {"200": {"description": "y"}}}}
        },
    }
    with caplog.at_level(logging.WARNING):
        doc = merge(upstream, own, policies, jwt=True, public_url=None, max_body=1024)
    validate(doc)
    assert doc["paths"]["/healthz"]["get"]["summary"] == "ours"
    assert "/healthz on both sides" in caplog.text
    chat = doc["paths"]["/v1/chat"]["post"]
    assert "parameters" not in chat  # JWT mode: the gateway sets X-User-Id itself
    assert chat["security"] == [{"bearerAuth": []}, {}]
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert {"401", "413", "429"} <= set(chat["responses"])
    assert chat["x-ratelimit"] == ratelimit_of(policies, "POST", "/v1/chat")
    assert "`chat` 20/minute, burst 5" in chat["description"]
    off = merge(upstream, own, None, jwt=False, public_url=None, max_body=1024)
    assert "x-ratelimit" not in off["paths"]["/v1/chat"]["post"]
    assert "429" not in off["paths"]["/v1/chat"]["post"]["responses"]


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.urls.append(value)


@pytest.mark.parametrize("service", ["gateway", "upstream"])
async def test_docs_work_offline(
    service: str, make_gateway: GatewayFactory, chat_service: str, aiohttp_client: Any
) -> None:
    client: TestClient[Any, Any] | aiohttp.ClientSession
    if service == "gateway":
        client = await make_gateway(chat_service)
        base = ""
    else:
        client = aiohttp.ClientSession()
        base = chat_service
    try:
        async with client.get(f"{base}/docs") as resp:
            assert resp.status == 200
            assert resp.content_type == "text/html"
            page = await resp.text()
        links = Links()
        links.feed(page)
        assert len(links.urls) >= 3
        for url in links.urls:
            parts = urlsplit(url)
            assert not parts.scheme and not parts.netloc, url  # nothing off-origin
            async with client.get(f"{base}/{url.lstrip('/')}") as asset:
                assert asset.status == 200, url
                assert len(await asset.read()) > 100
        assert "validatorUrl: null" in page  # no badge fetched from swagger.io
        assert re.search(r'url: "openapi\.json"', page)
        assert not re.search(r"https?://", page)
    finally:
        await client.close()


# --- schemathesis --------------------------------------------------------------------------


async def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    gateway_process: GatewayStarter,
    chat_service: str,
    tmp_path: Path,
) -> None:
    generous = POLICIES.replace('"20/minute"', '"9999/minute"').replace("burst = 5", "burst = 999")
    gateway = await gateway_process(
        chat_service,
        GATEWAY_RATELIMIT_CONFIG=policy_file(tmp_path, text=generous),
        GATEWAY_ACCESS_LOG="false",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{gateway.url}/openapi.json",
        "--url",
        gateway.url,
        "--checks",
        "not_a_server_error,response_schema_conformance,"
        "content_type_conformance,status_code_conformance",
        "--max-examples",
        "15",
        "--seed",
        "7",
        "--workers",
        "1",
        "--phases",
        "examples,coverage,fuzzing",
        "--exclude-path",
        "/readyz",
        "--request-timeout",
        "10",
        "--no-shrink",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 240)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-6000:]
    assert re.search(r"\d+ passed", text), text[-3000:]
