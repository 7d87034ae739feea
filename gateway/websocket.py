"""WebSocket pass-through: the upgrade is made to the upstream first, then to the client, and
messages are relayed both ways until either side closes (its close code passed on)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from gateway.errors import UpstreamUnavailable
from gateway.metrics import Metrics

logger = logging.getLogger(__name__)

# Generated afresh by each side of a WebSocket handshake (RFC 6455 §4), never relayed.
HANDSHAKE = (
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Protocol",
    "Sec-WebSocket-Accept",
)


def is_websocket(request: web.BaseRequest) -> bool:
    return (
        request.method == "GET"
        and request.headers.get("Upgrade", "").lower() == "websocket"
        and "upgrade" in request.headers.get("Connection", "").lower()
    )


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> None:
    async for message in source:
        if message.type == WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type == WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        elif message.type == WSMsgType.ERROR:
            break
    code = source.close_code or aiohttp.WSCloseCode.GOING_AWAY
    await sink.close(code=code)


async def relay_websocket(
    request: web.Request,
    session: aiohttp.ClientSession,
    url: URL,
    headers: CIMultiDict[str],
    metrics: Metrics,
    extra_headers: dict[str, str] | None = None,
) -> web.WebSocketResponse:
    for name in HANDSHAKE:
        headers.popall(name, None)
    protocols = [
        p.strip()
        for value in request.headers.getall("Sec-WebSocket-Protocol", ())
        for p in value.split(",")
        if p.strip()
    ]
    try:
        upstream = await session.ws_connect(url, headers=headers, protocols=protocols)
    except aiohttp.WSServerHandshakeError as exc:
        metrics.upstream_errors.labels("websocket_handshake").inc()
        raise UpstreamUnavailable(
            f"the upstream refused the WebSocket upgrade ({exc.status})"
        ) from exc
    except aiohttp.ClientError as exc:
        metrics.upstream_errors.labels("connect").inc()
        raise UpstreamUnavailable("could not open a WebSocket to the upstream") from exc
    async with upstream:
        client = web.WebSocketResponse(protocols=[upstream.protocol] if upstream.protocol else ())
        if extra_headers:
            client.headers.update(extra_headers)  # the rate-limit fields, on the 101 too
        await client.prepare(request)
        tasks = [
            asyncio.ensure_future(_pump(client, upstream)),
            asyncio.ensure_future(_pump(upstream, client)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await task
        return client
