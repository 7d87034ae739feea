"""The data plane at the byte level: framing, hygiene, ordering, slow and stalled clients.

Raw sockets send what no client library would; the fake upstream records every request that
reaches it, so each test can say that nothing else did.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp.test_utils import TestClient

from gateway.edge.wire import printable
from gateway.keys import access_log_key, plane_key
from tests.conftest import wait_until
from tests.gateway.conftest import FakeUpstream, GatewayFactory
from tests.gateway.edge.rawhttp import RawResponse, connect, read_response, send
from tests.gateway.limiting.test_ratelimit import policy_file

HOST = b"Host: chat.example.com\r\n"


def problem(response: RawResponse) -> dict[str, Any]:
    assert response.header("Content-Type") == "application/problem+json"
    document: dict[str, Any] = json.loads(response.body)
    assert document["status"] == response.status
    return document


def port_of(client: TestClient[Any, Any]) -> int:
    port = client.port
    assert port is not None  # started
    return port


def seen_headers(upstream: FakeUpstream, index: int = -1) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    headers = cast(list[tuple[str, str]], upstream.state.requests[index]["headers"])
    for name, value in headers:
        out.setdefault(name.lower(), []).append(value)
    return out


# Each is refused with a 400 by llhttp or the checks after it, and closes the connection.
MALFORMED = {
    "CL and TE": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "duplicate CL": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Content-Length: 5\r\n\r\nhello",
    "list CL": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello",
    "CL +5": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
    "chunked, identity": b"POST /echo HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "xchunked": b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "duplicate TE": b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "gzip, chunked": b"POST /echo HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "TE in HTTP/1.0": b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "obs-fold": b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
    "bare LF": b"GET /echo HTTP/1.1\nHost: x\n\n",
    "space before colon": b"GET /echo HTTP/1.1\r\nHost : x\r\n\r\n",
    "chunk size overflow": b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"FFFFFFFFFFFFFFFFF\r\nx\r\n",
    "negative chunk": b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"-5\r\nhello\r\n0\r\n\r\n",
    "chunk 0x5": b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0x5\r\nhello\r\n0\r\n\r\n",
    "lower-case method": b"get /echo HTTP/1.1\r\nHost: x\r\n\r\n",
    "OPTIONS *": b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    "no Host": b"GET /echo HTTP/1.1\r\n\r\n",
    "two Hosts": b"GET /echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "HTTP/2.0 line": b"GET /echo HTTP/2.0\r\nHost: x\r\n\r\n",
    "HTTP/0.9 line": b"GET /echo\r\n\r\n",
    "h2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "relative target": b"GET echo HTTP/1.1\r\nHost: x\r\n\r\n",
    "NUL in a value": b"GET /echo HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
    "upgrade with a body": b"POST /echo HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\n"
    b"Connection: Upgrade\r\nContent-Length: 3\r\n\r\nabc",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_malformed_requests_get_a_400_and_nothing_reaches_the_upstream(
    upstream: FakeUpstream, make_gateway: GatewayFactory, case: str
) -> None:
    client = await make_gateway(upstream.url)
    # A well-formed request behind the malformed one must not be served either.
    data = MALFORMED[case] + b"GET /echo/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    (response,), rest = await send(port_of(client), data)
    assert response.status == 400, case
    assert response.header("Server") == "pixelcraft"
    assert response.header("Connection") == "close"
    assert problem(response)["title"] == "Bad Request"
    assert rest == b""  # closed, nothing more answered
    assert upstream.state.seen == []


async def test_connect_is_refused_with_405(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(upstream.url)
    data = b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\nGET / HTTP/1.1\r\n"
    (response,), rest = await send(port_of(client), data)
    assert response.status == 405
    assert "GET" in (response.header("Allow") or "")
    assert response.header("Server") == "pixelcraft"
    assert rest == b""
    assert upstream.state.seen == []


async def test_oversized_heads_are_refused(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(upstream.url)
    (response,), _ = await send(
        port_of(client), b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert response.status == 414
    many = b"".join(b"X-%d: y\r\n" % i for i in range(101))
    (response,), _ = await send(
        port_of(client), b"GET /echo HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n"
    )
    assert response.status == 431
    # One header line that never ends: refused once it passes the limit, not held in memory.
    reader, writer = await connect(port_of(client))
    writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Long: ")
    for _ in range(40):
        writer.write(b"v" * 4096)
    await writer.drain()
    response = await asyncio.wait_for(read_response(reader), 10)
    writer.close()
    assert response.status == 431
    assert upstream.state.seen == []


async def test_absolute_form_is_answered_and_never_changes_the_destination(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(upstream.url)
    data = b"GET http://evil.example:9999/echo/x?q=1 HTTP/1.1\r\nHost: chat.example.com\r\n\r\n"
    (response,), _ = await send(port_of(client), data, closes=False)
    assert response.status == 200
    assert upstream.state.seen == [("GET", "/echo/x?q=1")]
    # RFC 9112 §3.2.2: the target's authority stands in for Host.
    assert seen_headers(upstream)["x-forwarded-host"] == ["evil.example:9999"]
    (response,), _ = await send(
        port_of(client), b"GET ftp://evil.example/x HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert response.status == 400
    assert len(upstream.state.seen) == 1


async def test_h2c_upgrade_is_served_as_plain_http_and_the_trailing_request_too(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(upstream.url)
    data = (
        b"GET /echo/first HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\n"
        b"Connection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
        b"GET /echo/second HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    (first, second), _ = await send(port_of(client), data, 2, closes=False)
    assert (first.status, second.status) == (200, 200)
    assert first.header("Upgrade") is None
    assert upstream.state.seen == [("GET", "/echo/first"), ("GET", "/echo/second")]
    headers = seen_headers(upstream, 0)
    assert "upgrade" not in headers and "http2-settings" not in headers


async def test_pipelined_requests_are_answered_in_order_behind_a_429(
    upstream: FakeUpstream, make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    policies = policy_file(tmp_path, text='[default]\nrate = "1/minute"\nburst = 1\n')
    client = await make_gateway(upstream.url, gateway_ratelimit_config=policies)
    spent, fresh = uuid.uuid4().hex, uuid.uuid4().hex
    (warm,), _ = await send(
        port_of(client),
        b"GET /echo HTTP/1.1\r\nHost: x\r\nX-User-Id: %s\r\n\r\n" % spent.encode(),
        closes=False,
    )
    assert warm.status == 200
    data = b"".join(
        b"GET /echo/%d HTTP/1.1\r\nHost: x\r\nX-User-Id: %s\r\n\r\n" % (i, user.encode())
        for i, user in enumerate((spent, fresh, spent))
    )
    responses, _ = await send(port_of(client), data, 3, closes=False)
    assert [r.status for r in responses] == [429, 200, 429]
    assert json.loads(responses[1].body)["raw_path"] == "/echo/1"
    assert [path for _, path in upstream.state.seen] == ["/echo", "/echo/1"]


async def test_http_1_0_and_connection_close(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(upstream.url)
    # HTTP/1.0 asking for keep-alive gets it; a chunked upstream body reaches it delimited
    # by the connection's end instead (no chunked coding in 1.0).
    reader, writer = await connect(port_of(client))
    writer.write(b"GET /echo HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    response = await read_response(reader)
    assert (response.status, response.header("Connection")) == (200, "keep-alive")
    writer.write(b"GET /source?bytes=100000 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    response = await read_response(reader)
    assert response.header("Transfer-Encoding") is None
    assert response.header("Connection") == "close"
    assert len(response.body) == 100000  # read to the connection's end
    writer.close()
    (response,), rest = await send(port_of(client), b"GET /echo HTTP/1.0\r\n\r\n")
    assert response.header("Connection") == "close" and rest == b""
    data = b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    (response,), rest = await send(port_of(client), data)
    assert response.header("Connection") == "close" and rest == b""


async def test_connection_deadlines_never_cut_a_response_in_progress(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    """Keep-alive idleness and the next head's deadline apply between requests, not during a
    long response (an SSE stream outlives both)."""
    client = await make_gateway(
        upstream.url, gateway_keepalive_timeout=0.3, gateway_header_timeout=0.3
    )
    reader, writer = await connect(port_of(client))
    writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await read_response(reader)).status == 200
    writer.write(b"GET /forever HTTP/1.1\r\nHost: x\r\n\r\nGET /echo HT")  # and half a head
    await reader.readuntil(b"\r\n\r\n")
    loop = asyncio.get_running_loop()
    started = loop.time()
    ticks = 0
    while loop.time() - started < 1.2:  # four times both deadlines
        line = await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)
        assert line.endswith(b"data: tick\n\n")
        ticks += 1
    assert ticks >= 10
    writer.close()


async def test_head_and_bodiless_statuses_are_framed_without_a_body(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(upstream.url)
    reader, writer = await connect(port_of(client))
    writer.write(b"HEAD /source?bytes=5000 HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await read_response(reader, head_only=True)
    assert head.status == 200
    writer.write(b"HEAD /hop HTTP/1.1\r\nHost: x\r\n\r\n")  # a Content-Length, and no body
    head = await read_response(reader, head_only=True)
    assert head.header("Content-Length") == "2"
    writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")  # the connection is still in step
    response = await asyncio.wait_for(read_response(reader), 5)
    assert json.loads(response.body)["method"] == "GET"
    writer.close()


async def test_client_headers_that_must_not_reach_the_upstream(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(upstream.url)
    data = (
        b"GET /echo HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic c2VjcmV0\r\n"
        b"X_User_Id: alice\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n"
        b"X-Kept: yes\r\n\r\n"
    )
    (response,), _ = await send(port_of(client), data, closes=False)
    assert response.status == 200
    headers = seen_headers(upstream)
    for name in ("proxy-authorization", "x_user_id", "forwarded", "x-real-ip"):
        assert name not in headers, name
    assert headers["x-kept"] == ["yes"]
    assert headers["x-user-id"] == ["ip:127.0.0.1"]  # the underscore name was not believed


async def test_a_trusted_proxy_may_pass_forwarded_and_x_real_ip(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(upstream.url, gateway_trusted_proxies="127.0.0.1/32")
    data = (
        b"GET /echo HTTP/1.1\r\nHost: x\r\nForwarded: for=203.0.113.9\r\n"
        b"X-Real-IP: 203.0.113.9\r\n\r\n"
    )
    await send(port_of(client), data, closes=False)
    headers = seen_headers(upstream)
    assert headers["forwarded"] == ["for=203.0.113.9"]
    assert headers["x-real-ip"] == ["203.0.113.9"]


async def test_a_502_never_names_the_upstream(make_gateway: GatewayFactory, caplog: Any) -> None:
    with socket_port() as port:
        client = await make_gateway(f"http://127.0.0.1:{port}")
        resp = await client.get("/anything")
    assert resp.status == 502
    text = await resp.text()
    assert str(port) not in text and "127.0.0.1" not in text
    assert any(str(port) in record.getMessage() for record in caplog.records)  # logged instead


class socket_port:
    """A port with nothing listening on it, held for the duration."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


async def test_expect_100_continue_only_after_size_and_limits_pass(
    upstream: FakeUpstream, make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    policies = policy_file(tmp_path, text='[default]\nrate = "1/minute"\nburst = 1\n')
    client = await make_gateway(
        upstream.url, gateway_ratelimit_config=policies, gateway_max_body_bytes=1000
    )
    user = uuid.uuid4().hex.encode()
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nX-User-Id: %s\r\nExpect: 100-continue\r\n" % user
    # Over the size limit: the 413 comes first, and no 100.
    (response,), _ = await send(port_of(client), head + b"Content-Length: 5000\r\n\r\n")
    assert response.status == 413
    # Within it: 100, then the body is sent, then the answer.
    reader, writer = await connect(port_of(client))
    writer.write(head + b"Content-Length: 5\r\n\r\n")
    interim = await asyncio.wait_for(read_response(reader), 5)
    assert interim.status == 100
    writer.write(b"hello")
    final = await asyncio.wait_for(read_response(reader), 5)
    assert final.status == 200 and json.loads(final.body)["body_bytes"] == 5
    writer.close()
    # Over the limit: the 429 comes first, and no 100.
    (response,), _ = await send(port_of(client), head + b"Content-Length: 5\r\n\r\n")
    assert response.status == 429
    assert [path for _, path in upstream.state.seen] == ["/echo"]


async def test_log_lines_escape_request_data(
    upstream: FakeUpstream, make_gateway: GatewayFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    client = await make_gateway(upstream.url)
    # Percent-encoded CR, LF and ESC in the path: the upstream's router decodes them, the log
    # must not.
    await send(port_of(client), b"GET /echo/%0D%0Aforged%1B[31m HTTP/1.1\r\nHost: x\r\n\r\n",
               closes=False)  # fmt: skip
    client.app[access_log_key].flush()
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "gateway.access" in line)
    assert "/echo/%0D%0Aforged%1B[31m" in line
    assert "\x1b" not in err and "\r" not in err
    assert printable("a\rb\x1bc\x85\\") == "a\\x0db\\x1bc\\x85\\\\"


async def test_every_answer_says_server_pixelcraft(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(upstream.url)
    for data in (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /hop HTTP/1.1\r\nHost: x\r\n\r\n",  # the upstream says `Server: upstream/1.0`
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello on the HTTP port
    ):
        (response,), _ = await send(port_of(client), data, closes=False)
        assert response.header("Server") == "pixelcraft", data
    (response,), _ = await send(
        port_of(client),
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        closes=False,
    )
    assert response.status == 405 and response.header("Allow") == "GET, HEAD"


# --- bodies: buffered, streamed, slow, stalled ------------------------------------------------


async def test_slow_bodies_never_hold_the_upstream_pool(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    """100 connections trickling a body from one address; another address is served."""
    client = await make_gateway(
        upstream.url,
        gateway_upstream_pool_size=4,
        gateway_upstream_connect_timeout=1,
        gateway_client_body_timeout=30,
    )
    tricklers = []
    for _ in range(100):
        _reader, writer = await connect(port_of(client), local="127.0.0.2")
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\nabc")
        tricklers.append(writer)
    for writer in tricklers:
        await writer.drain()
    plane = client.app[plane_key]
    await wait_until(lambda: plane.buffered == 300, within=10)
    try:
        for i in range(20):
            resp = await client.post("/echo", data=os.urandom(100), headers={"X-User-Id": f"u{i}"})
            assert resp.status == 200  # a held pool would be a 504 after the 1 s connect timeout
            await resp.read()
        assert upstream.state.seen == [("POST", "/echo")] * 20
    finally:
        for writer in tricklers:
            writer.close()
    await wait_until(lambda: plane.buffered == 0, within=10)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_stalled_uploads_get_408_and_are_closed(
    upstream: FakeUpstream, make_gateway: GatewayFactory, chunked: bool
) -> None:
    client = await make_gateway(upstream.url, gateway_client_body_timeout=0.5)
    framing = (
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
        if chunked
        else (b"Content-Length: 1000000\r\n\r\nabc")
    )
    reader, writer = await connect(port_of(client))
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\n" + framing)
    started = time.monotonic()
    response = await asyncio.wait_for(read_response(reader), 10)
    assert response.status == 408
    assert problem(response)["title"] == "Request Timeout"
    assert response.header("Connection") == "close"
    assert await asyncio.wait_for(reader.read(), 10) == b""
    assert time.monotonic() - started >= 0.5
    writer.close()
    assert upstream.state.seen == []


async def test_a_stalled_streamed_upload_aborts_its_upstream_request(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    """Past the buffer the body streams; a stall then is a 408 too, and the upstream request
    (which has a connection by then) is aborted."""
    client = await make_gateway(
        upstream.url, gateway_client_body_timeout=0.5, gateway_client_body_buffer_bytes=65536
    )
    reader, writer = await connect(port_of(client))
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
    writer.write(b"x" * 100_000)
    await writer.drain()
    await wait_until(lambda: upstream.state.seen == [("POST", "/echo")], within=5)
    response = await asyncio.wait_for(read_response(reader), 10)
    assert response.status == 408
    writer.close()
    # The echo handler never completed: its request was cut, not finished with a short body.
    assert upstream.state.requests == []


async def test_body_buffers_are_bounded_in_total(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(
        upstream.url,
        gateway_client_body_buffer_bytes=65536,
        gateway_client_body_buffer_total_bytes=200_000,
    )
    holders = []
    for _ in range(3):
        reader, writer = await connect(port_of(client))
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 65000\r\n\r\n")
        writer.write(b"y" * 64000)
        await writer.drain()
        holders.append((reader, writer))
    plane = client.app[plane_key]
    await wait_until(lambda: plane.buffered == 192000, within=5)
    (response,), _ = await send(
        port_of(client),
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\n" + b"z" * 20000,
    )
    assert response.status == 503 and response.header("Retry-After") == "1"
    for reader, writer in holders:  # the held ones complete normally
        writer.write(b"y" * 1000)
        assert (await asyncio.wait_for(read_response(reader), 5)).status == 200
        writer.close()
    assert plane.buffered == 0


async def test_download_pauses_the_upstream_while_the_client_does_not_read(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(upstream.url)
    reader, writer = await connect(port_of(client))
    writer.write(b"GET /source?bytes=%d HTTP/1.1\r\nHost: x\r\n\r\n" % (512 << 20))
    await reader.readuntil(b"\r\n\r\n")  # then read nothing

    async def stalled() -> bool:
        before = upstream.state.sent
        await asyncio.sleep(0.3)  # sampling a counter: has it stopped moving?
        return before > 0 and upstream.state.sent == before

    await wait_until(stalled, within=20)
    # Only socket buffers and two high-water marks' worth, not the body.
    stalled_at = upstream.state.sent
    assert stalled_at < 64 << 20
    total = 0
    while total < 32 << 20:  # reading again lets it go on
        total += len(await reader.read(1 << 20))
    await wait_until(lambda: upstream.state.sent > stalled_at + (16 << 20), within=20)
    writer.close()


async def test_upload_pauses_the_client_while_the_upstream_does_not_read(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(upstream.url, gateway_max_body_bytes=1 << 30)
    reader, writer = await connect(port_of(client))
    total = 512 << 20
    writer.write(b"POST /slow-sink HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % total)
    sent = 0
    block = b"u" * (1 << 20)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(3):
            while sent < total:
                writer.write(block)
                await writer.drain()  # blocks once the gateway stops reading
                sent += len(block)
    assert sent < 64 << 20
    upstream.state.release.set()
    while sent < total:
        writer.write(block)
        await writer.drain()
        sent += len(block)
    response = await asyncio.wait_for(read_response(reader), 30)
    assert json.loads(response.body)["body_bytes"] == total
    writer.close()


class ForgetfulUpstream:
    """A raw upstream whose first connection from the gateway's pool answers one request,
    keeps alive, then closes on the next without a word: the keep-alive race (it closed just
    as the gateway sent). Requests of the gateway's own (boot check, OpenAPI document: no
    X-Request-Id) are answered and not recorded."""

    def __init__(self) -> None:
        self.pooled = 0  # connections that carried proxied requests
        self.requests: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = 0
        answered = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                if b"\r\nX-Request-Id:" in head:
                    if not number:
                        self.pooled += 1
                        number = self.pooled
                    self.requests.append(head.split(b" ")[1])
                    if number == 1 and answered == 1:
                        break  # the race: closed, nothing answered
                    answered += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


@pytest.mark.parametrize(("method", "status"), [("GET", 200), ("POST", 502)])
async def test_the_keep_alive_race_is_retried_once_for_idempotent_methods(
    make_gateway: GatewayFactory, method: str, status: int
) -> None:
    forgetful = ForgetfulUpstream()
    server = await asyncio.start_server(forgetful.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = await make_gateway(f"http://127.0.0.1:{port}", gateway_ratelimit_enabled=False)
        first = await client.get("/a")
        assert first.status == 200
        second = await client.request(method, "/b", data=b"x" if method == "POST" else None)
        assert second.status == status
        # GET: sent again on a new connection; POST: never twice (it may have been acted on).
        expected = [b"/a", b"/b", b"/b"] if method == "GET" else [b"/a", b"/b"]
        assert forgetful.requests == expected
    finally:
        server.close()
        await server.wait_closed()
