"""Forwarding through a real gateway to a real (scripted) upstream, over sockets."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from typing import Any

import aiohttp
import jwt
import pytest
from yarl import URL

from devtools.services import free_port
from gateway.keys import access_log_key
from gateway.metrics import metrics_key
from tests.conftest import wait_until
from tests.gateway.conftest import FakeUpstream, GatewayFactory

JWT_SECRET = "k" * 40


def headers_of(seen: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in seen["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


async def test_request_passes_with_method_path_query_and_body(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(upstream.url)
    body = os.urandom(3000)
    url = client.make_url("").join(URL("/echo/a%20b/c?x=1&y=%2F&z=%C3%A9", encoded=True))
    resp = await client.session.put(url, data=body, headers={"X-User-Id": "u1"})
    assert resp.status == 200
    seen = await resp.json()
    assert (seen["method"], seen["raw_path"]) == ("PUT", "/echo/a%20b/c?x=1&y=%2F&z=%C3%A9")
    assert seen["body_bytes"] == 3000
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_hop_by_hop_and_forwarding_headers_on_the_way_in(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(upstream.url)
    resp = await client.get(
        "/echo",
        headers={
            "Connection": "keep-alive, X-Client-Hop",
            "X-Client-Hop": "must-not-pass",
            "Keep-Alive": "timeout=5",
            "Proxy-Connection": "keep-alive",
            "TE": "trailers",
            "Trailer": "X-Sum",
            "X-End-To-End": "passes",
            "X-Forwarded-For": "6.6.6.6",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "evil.example",
            "X-User-Id": "alice",
            "Host": "chat.example.com",
        },
    )
    seen = headers_of(await resp.json())
    for hop in ("x-client-hop", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"):
        assert hop not in seen, hop
    assert seen.get("connection", ["keep-alive"]) == ["keep-alive"]  # the gateway's own hop
    assert seen["x-end-to-end"] == ["passes"]
    # The peer is not a trusted proxy: its forwarding claims are replaced, not believed.
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == ["chat.example.com"]
    assert seen["x-user-id"] == ["alice"]
    assert seen["x-request-id"] == [resp.headers["X-Request-Id"]]
    assert len(resp.headers["X-Request-Id"]) == 32


async def test_trusted_proxy_chain_is_honoured(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(upstream.url, gateway_trusted_proxies="127.0.0.0/8,10.0.0.0/8")
    resp = await client.get(
        "/echo",
        headers={
            "X-Forwarded-For": "6.6.6.6, 203.0.113.9, 10.1.2.3",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "chat.example.com",
        },
    )
    seen = headers_of(await resp.json())
    # Right to left over trusted hops (127.0.0.1 the peer, 10.1.2.3): the client is 203.0.113.9.
    assert seen["x-user-id"] == ["ip:203.0.113.9"]
    assert seen["x-forwarded-for"] == ["6.6.6.6, 203.0.113.9, 10.1.2.3, 127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["https"]
    assert seen["x-forwarded-host"] == ["chat.example.com"]


async def test_spoofed_forwarded_for_from_untrusted_peer_changes_nothing(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(upstream.url, gateway_trusted_proxies="10.0.0.0/8")
    resp = await client.get("/echo", headers={"X-Forwarded-For": "203.0.113.9"})
    seen = headers_of(await resp.json())
    assert seen["x-user-id"] == ["ip:127.0.0.1"]
    assert seen["x-forwarded-for"] == ["127.0.0.1"]


async def test_hop_by_hop_removed_on_the_way_out(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(upstream.url)
    resp = await client.get("/hop")
    assert await resp.text() == "ok"
    for hop in ("X-Upstream-Private", "Keep-Alive", "Proxy-Connection", "Trailer", "Upgrade"):
        assert hop not in resp.headers, hop
    assert resp.headers["X-End-To-End"] == "kept"
    assert resp.headers["Server"] == "pixelcraft"


async def test_request_id_kept_when_well_formed(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(upstream.url)
    resp = await client.get("/echo", headers={"X-Request-Id": "trace-42.a:b"})
    assert resp.headers["X-Request-Id"] == "trace-42.a:b"
    assert headers_of(await resp.json())["x-request-id"] == ["trace-42.a:b"]
    ids = []
    for bad in ("bad id\twith junk", "x" * 129, "semi;colon"):
        resp = await client.get("/echo", headers={"X-Request-Id": bad})
        replaced = resp.headers["X-Request-Id"]
        # The gateway's own id (32 hex digits), the same one the upstream was given.
        assert re.fullmatch("[0-9a-f]{32}", replaced), replaced
        assert headers_of(await resp.json())["x-request-id"] == [replaced]
        ids.append(replaced)
    assert len(set(ids)) == 3  # a fresh one each time


async def test_sse_events_pass_one_by_one(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    """Each event reaches the client while the upstream has not yet been told to send the next."""
    client = await make_gateway(upstream.url)
    upstream.state.events.put_nowait("e0")
    resp = await client.get("/sse")
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    for i in range(5):
        block = b""
        while not block.endswith(b"\n\n"):
            block += await resp.content.readuntil(b"\n\n")
        assert json.loads(block.split(b"data: ")[1]) == f"e{i}"
        assert upstream.state.events.empty()  # nothing more exists upstream to buffer behind it
        upstream.state.events.put_nowait(f"e{i + 1}" if i < 4 else None)
    assert await resp.content.read() == b""


async def test_client_disconnect_cancels_the_upstream_request(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(upstream.url)
    resp = await client.get("/forever")
    assert await resp.content.readuntil(b"\n\n") == b"data: tick\n\n"
    resp.close()
    await wait_until(upstream.state.cancelled.is_set, within=1.0)


async def test_upstream_refusing_is_502(make_gateway: GatewayFactory) -> None:
    client = await make_gateway(f"http://127.0.0.1:{free_port()}")
    resp = await client.get("/anything")
    assert resp.status == 502
    assert resp.headers["Content-Type"] == "application/problem+json"
    problem = await resp.json()
    assert problem["title"] == "Bad Gateway"
    assert problem["request_id"] == resp.headers["X-Request-Id"]
    metrics = client.app[metrics_key]
    assert metrics.upstream_errors.labels("connect")._value.get() == 1


async def test_upstream_reset_before_response_is_502(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(upstream.url)
    resp = await client.get("/reset-before")
    assert resp.status == 502


async def test_no_first_byte_in_time_is_504(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(upstream.url, gateway_upstream_first_byte_timeout=0.3)
    resp = await client.get("/wait")
    assert resp.status == 504
    assert (await resp.json())["title"] == "Gateway Timeout"


async def test_stream_that_keeps_sending_is_never_cut(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    """Timeouts are per silence, not total: a 1 s stream outlives 0.3 s timeouts."""
    client = await make_gateway(
        upstream.url, gateway_upstream_first_byte_timeout=0.3, gateway_upstream_read_timeout=0.3
    )
    resp = await client.get("/forever")
    started = time.monotonic()
    ticks = 0
    while time.monotonic() - started < 1.0:
        assert await resp.content.readuntil(b"\n\n") == b"data: tick\n\n"
        ticks += 1
    assert ticks >= 10
    resp.close()


@pytest.mark.parametrize("path", ["/stall-body", "/reset-mid-body", "/reset-mid-body?chunked=1"])
async def test_upstream_failing_mid_body_aborts_the_client(
    upstream: FakeUpstream, make_gateway: GatewayFactory, path: str
) -> None:
    """Never a truncated body that looks complete: the client sees the connection break."""
    client = await make_gateway(upstream.url, gateway_upstream_read_timeout=0.3)
    resp = await client.get(path)
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()


async def test_small_body_failing_midway_is_still_a_clean_error(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    """Bodies up to 64 KiB with a Content-Length are read whole first: a failure is a status."""
    client = await make_gateway(upstream.url, gateway_upstream_read_timeout=0.3)
    resp = await client.get("/reset-mid-body", params={"size": "1000"})
    assert resp.status == 502
    resp = await client.get("/stall-body", params={"size": "1000"})
    assert resp.status == 504


async def test_oversized_bodies_are_413_before_reaching_the_upstream(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(upstream.url, gateway_max_body_bytes=1000)
    resp = await client.post("/echo", data=b"a" * 1001)
    assert resp.status == 413
    assert (await resp.json())["title"] == "Content Too Large"

    async def chunks(n: int) -> Any:
        for _ in range(n):
            yield b"b" * 100

    resp = await client.post("/echo", data=chunks(11))  # chunked, no Content-Length
    assert resp.status == 413
    assert upstream.state.requests == []
    resp = await client.post("/echo", data=chunks(10))
    assert resp.status == 200 and (await resp.json())["body_bytes"] == 1000


async def test_large_chunked_body_streams_past_the_prefetch(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(upstream.url, gateway_max_body_bytes=8 << 20)
    payload = os.urandom(1 << 16)

    async def chunks(n: int) -> Any:
        for _ in range(n):
            yield payload

    resp = await client.post("/echo", data=chunks(64))  # 4 MiB, over the 1 MiB prefetch
    seen = await resp.json()
    assert seen["body_bytes"] == 4 << 20 and seen["chunked"]
    resp = await client.post("/echo", data=chunks(200))  # 12.5 MiB: over the limit mid-stream
    assert resp.status == 413


async def test_large_download_arrives_whole(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(upstream.url)
    resp = await client.get("/source", params={"bytes": str(20 << 20)})
    total = 0
    async for chunk in resp.content.iter_any():
        total += len(chunk)
    assert total == 20 << 20


async def test_header_identity_and_its_errors(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(upstream.url)
    for bad, why in (
        ([("X-User-Id", "has space")], "must match"),
        ([("X-User-Id", "a"), ("X-User-Id", "b")], "more than once"),
        ([("X-User-Id", "x" * 129)], "must match"),
    ):
        resp = await client.get("/echo", headers=bad)
        assert resp.status == 400
        problem = await resp.json()
        assert problem["header"] == "X-User-Id" and why in problem["detail"]
    assert upstream.state.requests == []


async def test_jwt_identity(upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
    client = await make_gateway(
        upstream.url, gateway_jwt_secret=JWT_SECRET, gateway_user_id_header="trusted"
    )
    token = jwt.encode({"sub": "user-123", "exp": int(time.time()) + 60}, JWT_SECRET, "HS256")
    resp = await client.get(
        "/echo", headers={"Authorization": f"Bearer {token}", "X-User-Id": "spoofed"}
    )
    assert headers_of(await resp.json())["x-user-id"] == ["user-123"]

    resp = await client.get("/echo", headers={"X-User-Id": "spoofed"})  # no token: by address
    assert headers_of(await resp.json())["x-user-id"] == ["ip:127.0.0.1"]

    expired = jwt.encode({"sub": "user-123", "exp": int(time.time()) - 600}, JWT_SECRET, "HS256")
    for bad in (expired, "not.a.jwt", jwt.encode({"sub": "u", "exp": 2**31}, "x" * 40, "HS256")):
        resp = await client.get("/echo", headers={"Authorization": f"Bearer {bad}"})
        assert resp.status == 401
        challenge = resp.headers["WWW-Authenticate"]
        assert challenge.startswith('Bearer realm="pixelcraft", error="invalid_token"')
        assert bad not in challenge
    assert len(upstream.state.requests) == 2


async def test_websocket_is_passed_through(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(upstream.url)
    async with client.ws_connect("/ws", protocols=("chat.v1",)) as ws:
        assert ws.protocol == "chat.v1"
        await ws.send_str("hello")
        assert (await ws.receive_str()) == "echo:hello"
        await ws.send_bytes(b"abc")
        assert (await ws.receive_bytes()) == b"cba"
        await ws.send_str("close")
        message = await ws.receive()
        assert message.type == aiohttp.WSMsgType.CLOSE and message.data == 4001


async def test_an_idle_websocket_is_closed(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(upstream.url, gateway_websocket_idle_timeout=0.5)
    async with client.ws_connect("/ws", protocols=("chat.v1",), autoping=False) as ws:
        await ws.send_str("hello")
        assert (await ws.receive_str()) == "echo:hello"
        message = await asyncio.wait_for(ws.receive(), 10)  # nothing sent: the tunnel closes
        assert message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSE)


async def test_metrics_count_by_route_template(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(upstream.url)
    ids = ["3f1b0c8e-4a7d-4f6e-9a55-2b8f0d1c2e3a", "12345", "9c2e7f10-1b2a-4c3d-8e9f-a0b1c2d3e4f5"]
    for ident in ids:
        await (await client.get(f"/echo/items/{ident}")).read()
    await (await client.get("/healthz")).read()
    text, _ = client.app[metrics_key].render()
    exposition = text.decode()
    assert (
        'gateway_http_requests_total{method="GET",route="/echo/items/{id}",status="200"} 3.0'
        in exposition
    )
    assert (
        'gateway_http_requests_total{method="GET",route="/healthz",status="200"} 1.0' in exposition
    )
    assert "gateway_inflight_requests 0.0" in exposition


async def test_access_log_line_per_response(
    upstream: FakeUpstream, make_gateway: GatewayFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    client = await make_gateway(upstream.url, gateway_log_format="json")
    resp = await client.get("/echo/x?token=secret-in-query", headers={"X-User-Id": "alice"})
    await resp.read()
    resp = await client.get("/echo", headers={"X-User-Id": "bad id"})
    client.app[access_log_key].flush()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    access = [line for line in lines if line.get("logger") == "gateway.access"]
    assert [(a["method"], a["path"], a["status"], a["identity"]) for a in access] == [
        ("GET", "/echo/x", 200, "header"),
        ("GET", "/echo", 400, "-"),
    ]
    first = access[0]
    assert (
        len(first["request_id"]) == 32 and access[1]["request_id"] == resp.headers["X-Request-Id"]
    )
    assert first["bytes"] > 0 and first["duration_ms"] > 0
    text = "\n".join(json.dumps(a) for a in access)
    assert "alice" not in text and "secret-in-query" not in text


async def test_slow_upload_is_not_a_first_byte_timeout(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    """The first-byte clock starts once the request body is sent, not when it starts."""
    client = await make_gateway(upstream.url, gateway_upstream_first_byte_timeout=0.3)

    async def trickle() -> Any:
        for _ in range(8):
            await asyncio.sleep(0.1)  # pacing the upload, not waiting for anything
            yield b"p" * 100

    resp = await client.post("/echo", data=trickle(), headers={"Content-Length": "800"})
    assert resp.status == 200
    assert (await resp.json())["body_bytes"] == 800
