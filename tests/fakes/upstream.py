"""A scriptable upstream for gateway tests: echoes requests, streams on cue, fails on purpose."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import struct
import termios
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web
from aiohttp.typedefs import Handler

from tests.conftest import wait_until


@dataclass
class UpstreamState:
    """What the fake saw, and the levers a test pulls."""

    requests: list[dict[str, object]] = field(default_factory=list)
    seen: list[tuple[str, str]] = field(default_factory=list)  # (method, raw path) proxied
    sent: int = 0  # bytes /source has written so far
    events: asyncio.Queue[object] = field(default_factory=asyncio.Queue)  # None ends /sse
    written: asyncio.Queue[int] = field(default_factory=asyncio.Queue)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)


state_key = web.AppKey("state", UpstreamState)


async def echo(request: web.Request) -> web.Response:
    """Everything the upstream received, as JSON (headers as a list: duplicates kept)."""
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    seen = {
        "method": request.method,
        "path": request.path,
        "raw_path": request.raw_path,
        "headers": list(request.headers.items()),
        "body_bytes": size,
        "body_sha256": digest.hexdigest(),
        "chunked": request.headers.get("Transfer-Encoding") == "chunked",
    }
    request.app[state_key].requests.append(seen)
    return web.json_response(seen)


async def sse(request: web.Request) -> web.StreamResponse:
    """One SSE event per item the test puts in `events`; None ends the stream."""
    state = request.app[state_key]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    n = 0
    try:
        while (item := await state.events.get()) is not None:
            await response.write(f"event: tick\ndata: {json.dumps(item)}\n\n".encode())
            n += 1
            state.written.put_nowait(n)
        await response.write_eof()
    except asyncio.CancelledError:
        state.cancelled.set()
        raise
    return response


async def stream_forever(request: web.Request) -> web.StreamResponse:
    """Sends a chunk every 50 ms until the client (the gateway) goes away."""
    state = request.app[state_key]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    try:
        while True:
            await response.write(b"data: tick\n\n")
            await asyncio.sleep(0.05)
    except (asyncio.CancelledError, ConnectionError):
        state.cancelled.set()
        raise


async def wait_then_answer(request: web.Request) -> web.Response:
    """Answers only once the test sets `release` (first-byte timeout tests)."""
    await request.app[state_key].release.wait()
    return web.json_response({"late": True})


async def stall_body(request: web.Request) -> web.StreamResponse:
    """Sends part of a body, then goes silent until released (idle-read timeout tests)."""
    size = int(request.query.get("size", 1 << 20))
    response = web.StreamResponse()
    response.content_length = size
    await response.prepare(request)
    await response.write(b"x" * 10)
    await request.app[state_key].release.wait()
    await response.write(b"x" * (size - 10))
    return response


async def reset_mid_body(request: web.Request) -> web.StreamResponse:
    """Promises a body, sends part of it, then resets the connection."""
    chunked = request.query.get("chunked") == "1"
    response = web.StreamResponse()
    if not chunked:
        response.content_length = int(request.query.get("size", 1 << 20))
    await response.prepare(request)
    await response.write(b"y" * 100)
    transport = request.transport
    assert transport is not None
    sock = transport.get_extra_info("socket")

    def delivered() -> bool:
        """All written so far is in the gateway's hands: nothing left in the transport's
        buffer, nothing unacknowledged in the kernel's send queue (SIOCOUTQ)."""
        if transport.get_write_buffer_size():
            return False
        unsent = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
        queued: int = struct.unpack("i", unsent)[0]
        return queued == 0

    await wait_until(delivered, within=5, interval=0.001)
    transport.abort()
    return response


async def reset_before_response(request: web.Request) -> web.StreamResponse:
    assert request.transport is not None
    request.transport.abort()
    return web.Response()


async def hop_by_hop(request: web.Request) -> web.Response:
    """A response carrying hop-by-hop headers the gateway must not pass on."""
    return web.Response(
        text="ok",
        headers={
            "Connection": "keep-alive, X-Upstream-Private",
            "X-Upstream-Private": "secret-hop",
            "Keep-Alive": "timeout=5",
            "Proxy-Connection": "keep-alive",
            "Trailer": "X-Checksum",
            "Upgrade": "h2c",
            "X-End-To-End": "kept",
            "Server": "upstream/1.0",
        },
    )


async def source(request: web.Request) -> web.StreamResponse:
    """`bytes` bytes in 64 KiB chunks, chunked encoding."""
    total = int(request.query["bytes"])
    response = web.StreamResponse()
    await response.prepare(request)
    block = b"z" * 65536
    sent = 0
    state = request.app[state_key]
    while sent < total:
        part = block[: min(len(block), total - sent)]
        await response.write(part)
        sent += len(part)
        state.sent = sent
    await response.write_eof()
    return response


async def slow_sink(request: web.Request) -> web.Response:
    """Reads the request body only once the test sets `release` (upload flow control)."""
    state = request.app[state_key]
    await state.release.wait()
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
    return web.json_response({"body_bytes": size})


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(protocols=("chat.v1",))
    await ws.prepare(request)
    async for message in ws:
        if message.type == WSMsgType.TEXT:
            if message.data == "close":
                await ws.close(code=4001, message=b"asked to")
            else:
                await ws.send_str(f"echo:{message.data}")
        elif message.type == WSMsgType.BINARY:
            await ws.send_bytes(message.data[::-1])
    return ws


# What the gateway labels its metrics with: only the paths an upstream documents.
DOCUMENTED = ("/echo", "/echo/items/{id}", "/sse", "/forever", "/source", "/ws")


async def openapi(request: web.Request) -> web.Response:
    ok = {"responses": {"200": {"description": "ok"}}}
    return web.json_response(
        {
            "openapi": "3.0.3",
            "info": {"title": "fake upstream", "version": "1"},
            "paths": {path: {"get": ok} for path in DOCUMENTED},
        }
    )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@web.middleware
async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request a client sent through the gateway (they carry X-Request-Id; the
    gateway's own, its boot check and OpenAPI fetch, do not), whatever its route."""
    if "X-Request-Id" in request.headers:
        request.app[state_key].seen.append((request.method, request.raw_path))
    return await handler(request)


def create_fake_upstream(state: UpstreamState | None = None) -> web.Application:
    app = web.Application(client_max_size=1 << 31, middlewares=[record])
    app[state_key] = state if state is not None else UpstreamState()
    app.router.add_route("*", "/echo{tail:.*}", echo)
    app.router.add_get("/sse", sse)
    app.router.add_get("/forever", stream_forever)
    app.router.add_get("/wait", wait_then_answer)
    app.router.add_get("/stall-body", stall_body)
    app.router.add_get("/reset-mid-body", reset_mid_body)
    app.router.add_get("/reset-before", reset_before_response)
    app.router.add_get("/hop", hop_by_hop)
    app.router.add_get("/source", source)
    app.router.add_get("/ws", websocket)
    app.router.add_post("/slow-sink", slow_sink)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/openapi.json", openapi)
    return app
