"""The data plane's shared state and its listeners.

One DataPlane per gateway process, built by `create_app` with the values it uses (no settings
lookups per request) and given its collaborators by the app's cleanup contexts as they start:
the limiter, the token verifier, Redis (for /readyz), the outbound aiohttp session (for
/readyz's upstream check) and the API document. Each listener is a Site: TLS or not, and the
routes the gateway answers itself there.

Request bodies held in memory (those received whole before an upstream connection is taken)
are bounded twice: per request by GATEWAY_CLIENT_BODY_BUFFER_BYTES (past it a body streams),
and in total by GATEWAY_CLIENT_BODY_BUFFER_TOTAL_BYTES (past it a request is a 503 with
Retry-After), so no number of slow clients can grow the process without bound.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp

from gateway.edge.accesslog import AccessLog
from gateway.edge.connection import Connection
from gateway.edge.routes import Routes
from gateway.edge.upstream import UpstreamPool
from gateway.edge.wire import HSTS, Clock
from gateway.metrics import Metrics
from gateway.serving.lifecycle import Lifecycle
from gateway.settings import GatewaySettings
from pixelcraft.contract import REQUEST_ID

if TYPE_CHECKING:
    from redis.asyncio import Redis, RedisCluster

    from gateway.auth.tokens import TokenVerifier
    from gateway.edge.tunnel import Tunnel
    from gateway.limiting.limiter import Limiter
    from gateway.openapi import ApiDocument

logger = logging.getLogger(__name__)

BACKLOG = 1024


def request_ids() -> Callable[[], str]:
    """Fresh request ids: 32 hex digits, a random per-process prefix and a counter (unique,
    and far cheaper than uuid4 on the hot path; they identify, they do not authenticate)."""
    prefix = os.urandom(8).hex()
    counter = itertools.count(1)
    return lambda: f"{prefix}{next(counter):016x}"


class Site:
    """What a listener is: TLS or not, and the routes the gateway answers there itself."""

    __slots__ = ("hsts", "routes", "scheme", "tls")

    def __init__(self, routes: Routes, *, tls: bool) -> None:
        self.routes = routes
        self.tls = tls
        self.scheme = "https" if tls else "http"
        self.hsts = HSTS if tls else b""


class DataPlane:
    """Shared by every connection of one process: limits, timeouts, the pool, the counters."""

    def __init__(
        self,
        settings: GatewaySettings,
        metrics: Metrics,
        lifecycle: Lifecycle,
        access_log: AccessLog | None,
    ) -> None:
        self.metrics = metrics
        self.lifecycle = lifecycle
        self.access_log = access_log
        self.upstream_url = settings.gateway_upstream_url
        self.pool = UpstreamPool(settings.gateway_upstream_url, settings.gateway_upstream_pool_size)
        self.trusted = list(settings.gateway_trusted_proxies)
        self.user_header = settings.gateway_user_id_header
        self.plan_claim = tuple(settings.gateway_plan_claim.split("."))
        self.max_body = settings.gateway_max_body_bytes
        self.buffer_size = settings.gateway_client_body_buffer_bytes
        self.buffer_total = settings.gateway_client_body_buffer_total_bytes
        self.body_timeout = settings.gateway_client_body_timeout
        self.header_timeout = settings.gateway_header_timeout
        self.keepalive_timeout = settings.gateway_keepalive_timeout
        self.connect_timeout = settings.gateway_upstream_connect_timeout
        self.first_byte_timeout = settings.gateway_upstream_first_byte_timeout
        self.read_timeout = settings.gateway_upstream_read_timeout
        self.websocket_idle_timeout = settings.gateway_websocket_idle_timeout
        self.handshake_timeout = settings.gateway_tls_handshake_timeout
        self.clock = Clock()
        self.new_id = request_ids()
        self.request_id_ok = REQUEST_ID.match
        # Collaborators, set by the app's cleanup contexts as they start.
        self.limiter: Limiter | None = None
        self.verifier: TokenVerifier | None = None
        self.redis: Redis | RedisCluster = None  # type: ignore[assignment]
        self.session: aiohttp.ClientSession | None = None
        self.api_document: ApiDocument | None = None
        self.connections: set[Connection] = set()
        self.tunnels: set[Tunnel] = set()
        self.servers: list[asyncio.Server] = []
        self.buffered = 0  # request body bytes held in memory, all connections
        self.draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._errors: dict[str, Any] = {}

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def upstream_error(self, kind: str) -> None:
        child = self._errors.get(kind)
        if child is None:
            child = self._errors[kind] = self.metrics.upstream_errors.labels(kind)
        child.inc()

    async def upstream_health(self, timeout: float) -> str:
        """The upstream's /healthz, as /readyz reports it."""
        session = self.session
        if session is None:
            return "unreachable"
        try:
            async with asyncio.timeout(timeout):
                async with session.get(f"{self.upstream_url}/healthz") as resp:
                    return "ok" if resp.status == 200 else f"status {resp.status}"
        except (aiohttp.ClientError, TimeoutError):
            return "unreachable"

    async def listen(
        self,
        site: Site,
        host: str | None,
        port: int | None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
        sock: Any = None,
    ) -> asyncio.Server:
        """Serve `site` on host:port (or an already bound `sock`)."""
        timeout = self.handshake_timeout if ssl_context is not None else None
        if sock is not None:
            server = await self.loop.create_server(
                lambda: Connection(self, site),
                sock=sock,
                ssl=ssl_context,
                backlog=BACKLOG,
                ssl_handshake_timeout=timeout,
            )
        else:
            assert port is not None
            server = await self.loop.create_server(
                lambda: Connection(self, site),
                host,
                port,
                ssl=ssl_context,
                reuse_port=reuse_port,
                backlog=BACKLOG,
                ssl_handshake_timeout=timeout,
            )
        self.servers.append(server)
        return server

    def drain(self) -> None:
        """SIGTERM: from now on every response says `Connection: close`, /readyz is 503, and
        idle connections close at once."""
        self.draining = True
        self.lifecycle.draining = True
        for conn in list(self.connections):
            conn.drain()

    async def close(self) -> None:
        """Stop listening and cut whatever is still open."""
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            conn.abort()
        for tunnel in list(self.tunnels):
            tunnel.close()
        for server in self.servers:
            await server.wait_closed()
        self.servers.clear()
        self.pool.close()
