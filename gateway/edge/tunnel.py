"""WebSocket after the upstream's 101: both connections become one byte tunnel.

The handshake itself passed through the exchange (the client's checks, limits and headers;
the upstream's 101 with the gateway's headers added), so the two ends negotiated directly and
frames pass untouched. Flow control: an end whose peer's write buffer is over its high-water
mark stops reading. Idle timeout: GATEWAY_WEBSOCKET_IDLE_TIMEOUT without a byte either way
closes both (WebSocket pings count, so a live connection that pings never idles out).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.edge.exchange import Exchange


class _End(asyncio.Protocol):
    """One side of the tunnel: what it reads, its peer writes."""

    def __init__(self, tunnel: Tunnel, transport: asyncio.Transport) -> None:
        self.tunnel = tunnel
        self.transport = transport
        self.peer: _End | None = None

    def data_received(self, data: bytes) -> None:
        self.tunnel.last = self.tunnel.loop.time()
        assert self.peer is not None
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        return False  # one side finished: the tunnel closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.close()

    def pause_writing(self) -> None:
        assert self.peer is not None
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.peer is not None
        if not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()


class Tunnel:
    """Relays bytes between a client and the upstream until either closes or both idle."""

    def __init__(
        self,
        exchange: Exchange,
        client: asyncio.Transport,
        upstream: asyncio.Transport,
        upstream_rest: bytes,
        client_rest: bytes,
        idle_timeout: float,
    ) -> None:
        self.exchange = exchange
        self.loop = asyncio.get_running_loop()
        self.idle_timeout = idle_timeout
        self.last = self.loop.time()
        self.closed = False
        self.client = _End(self, client)
        self.upstream = _End(self, upstream)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        client.set_protocol(self.client)
        upstream.set_protocol(self.upstream)
        if upstream_rest:
            client.write(upstream_rest)
        if client_rest:
            upstream.write(client_rest)
        for transport in (client, upstream):
            if not transport.is_reading():
                transport.resume_reading()
        self.timer: asyncio.TimerHandle | None = self.loop.call_later(idle_timeout, self._check)
        exchange.plane.tunnels.add(self)

    def _check(self) -> None:
        self.timer = None
        due = self.last + self.idle_timeout
        now = self.loop.time()
        if now < due:
            self.timer = self.loop.call_later(due - now, self._check)
            return
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.client.transport.close()
        self.upstream.transport.close()
        self.exchange.plane.tunnels.discard(self)
        self.exchange.tunnel_closed()
