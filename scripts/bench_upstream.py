"""The fixed-response upstream `scripts/bench` measures against: aiohttp on uvloop, one process.

Routes, each as cheap as aiohttp allows so that the proxies' cost is what the bench sees:
- `GET /fixed`: a ~100-byte JSON body with Content-Length;
- `GET /sse?n=100&interval=0.01`: n Server-Sent Events, each carrying the sender's
  `time.monotonic_ns()` taken just before the write (CLOCK_MONOTONIC is one clock for every
  process on a Linux host, so the client can subtract it from its own reading);
- `POST /sink`: reads a streamed request body and answers the byte count;
- `GET /source?bytes=N`: streams N bytes (Content-Length set) in 64 KiB chunks;
- `GET /healthz` and `GET /openapi.json` (a minimal document of these routes): what a gateway
  asks its upstream at boot and then every minute, so that its log stays free of warnings.

Run: `python scripts/bench_upstream.py --port 8001` (loopback only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import uvloop
from aiohttp import web

FIXED_BODY = json.dumps(
    {"service": "pixelcraft-bench", "route": "fixed", "ok": True, "payload": "x" * 31},
    separators=(",", ":"),
).encode()
OPENAPI = json.dumps(
    {
        "openapi": "3.0.3",
        "info": {"title": "pixelcraft-bench upstream", "version": "1"},
        "paths": {
            path: {method: {"responses": {"200": {"description": "OK"}}}}
            for path, method in (
                ("/fixed", "get"),
                ("/sse", "get"),
                ("/sink", "post"),
                ("/source", "get"),
            )
        },
    },
    separators=(",", ":"),
).encode()
CHUNK = bytes(64 * 1024)
MAX_EVENTS = 100_000
MAX_SOURCE_BYTES = 64 * 2**30


async def fixed(request: web.Request) -> web.Response:
    return web.Response(body=FIXED_BODY, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=OPENAPI, content_type="application/json")


def _query_number(request: web.Request, name: str, default: float, upper: float) -> float:
    try:
        value = float(request.query.get(name, default))
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be a number") from None
    if not 0 <= value <= upper:
        raise web.HTTPBadRequest(text=f"{name} must be between 0 and {upper}")
    return value


async def sse(request: web.Request) -> web.StreamResponse:
    """n events, `interval` seconds apart; `data:` is the monotonic_ns of the write."""
    count = int(_query_number(request, "n", 100, MAX_EVENTS))
    interval = _query_number(request, "interval", 0.01, 10)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    response.headers["Cache-Control"] = "no-cache"
    await response.prepare(request)
    for seq in range(count):
        await response.write(b"id: %d\ndata: %d\n\n" % (seq, time.monotonic_ns()))
        await asyncio.sleep(interval)
    await response.write_eof()
    return response


async def sink(request: web.Request) -> web.Response:
    received = 0
    async for chunk in request.content.iter_any():
        received += len(chunk)
    return web.json_response({"bytes": received})


async def source(request: web.Request) -> web.StreamResponse:
    total = int(_query_number(request, "bytes", len(CHUNK), MAX_SOURCE_BYTES))
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = total
    await response.prepare(request)
    view = memoryview(CHUNK)
    left = total
    while left > 0:
        piece = view[: min(left, len(CHUNK))]
        await response.write(piece)
        left -= len(piece)
    await response.write_eof()
    return response


def create_app() -> web.Application:
    app = web.Application(client_max_size=MAX_SOURCE_BYTES)
    app.router.add_get("/fixed", fixed)
    app.router.add_get("/sse", sse)
    app.router.add_post("/sink", sink)
    app.router.add_get("/source", source)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/openapi.json", openapi)
    return app


async def serve(host: str, port: int) -> None:
    runner = web.AppRunner(create_app(), access_log=None, handle_signals=True)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="scripts/bench_upstream.py",
        description="Tiny fixed-response upstream for scripts/bench (loopback only).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="listen port")
    args = parser.parse_args()
    if not args.host.startswith("127.") and args.host not in ("::1", "localhost"):
        parser.error("--host must be a loopback address")
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
