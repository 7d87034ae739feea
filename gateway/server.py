"""Serving the gateway: listeners, connection deadlines, signals, draining.

aiohttp has no deadline for reading a request's headers (a slowloris connection stays open
for as long as the keep-alive timeout allows), so the first request on a connection must arrive
whole within GATEWAY_HEADER_TIMEOUT; later ones within GATEWAY_KEEPALIVE_TIMEOUT of the previous
response, which aiohttp enforces itself. SIGTERM drains: /readyz turns 503, idle keep-alive
connections close, responses carry `Connection: close`, and requests and streams in flight get
GATEWAY_DRAIN_SECONDS to finish before the process exits 0. SIGHUP runs the reloaders.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from gateway.app import create_app
from gateway.keys import lifecycle_key
from gateway.metrics import Metrics, create_admin_app
from gateway.policies import Policies
from gateway.settings import GatewaySettings

logger = logging.getLogger(__name__)


class _DeadlineHandler(RequestHandler):
    """A connection whose first request's headers do not arrive in time is closed."""

    def __init__(self, manager: Any, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._header_deadline = self._loop.call_later(self._header_timeout, self._too_slow)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None
        super().connection_lost(exc)

    def _too_slow(self) -> None:
        # Left to fire rather than cancelled on the first request: an override of
        # data_received would cost a call per chunk received, this costs one per connection.
        self._header_deadline = None
        if not self._request_count:
            logger.debug("closing a connection that sent no complete request headers in time")
            self.force_close()


class _DeadlineServer(web.Server):
    header_timeout = 10.0

    def __call__(self) -> RequestHandler:
        return _DeadlineHandler(
            self, loop=self._loop, header_timeout=self.header_timeout, **self._kwargs
        )


class MalformedRequestLog(logging.Filter):
    """aiohttp logs a full traceback for every malformed request it answers with 400: a lever
    for flooding the log. Count them and say so at most once a minute instead."""

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self.interval = interval
        self.count = 0
        self._last = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        self.count += 1
        now = time.monotonic()
        if now - self._last < self.interval:
            return False
        self._last = now
        record.msg = "rejected malformed requests with 400 (%d so far; latest: %s)"
        record.args = (self.count, exc.message)
        record.exc_info = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


async def start_runner(
    app: web.Application, settings: GatewaySettings, *, public: bool
) -> web.AppRunner:
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,  # gateway.accesslog writes it, from the edge middleware
        keepalive_timeout=settings.gateway_keepalive_timeout,
        shutdown_timeout=0.5,  # draining happened before; what is left is cut
    )
    try:
        await runner.setup()
    except BaseException:
        await app.cleanup()  # the contexts that did start close what they opened
        raise
    if public and runner.server is not None:
        # aiohttp builds a plain Server; give it the header deadline (see _DeadlineHandler).
        runner.server.__class__ = _DeadlineServer
        runner.server.header_timeout = settings.gateway_header_timeout  # type: ignore[attr-defined]
    return runner


async def serve(
    settings: GatewaySettings,
    policies: Policies | None = None,
    *,
    reuse_port: bool = False,
    admin: bool = True,
) -> None:
    """Run one gateway process until SIGTERM/SIGINT (drained) ; SIGHUP reloads."""
    metrics = Metrics()
    app = create_app(settings, metrics, policies)
    lifecycle = app[lifecycle_key]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(lifecycle.reload()))
    logging.getLogger("aiohttp.server").addFilter(MalformedRequestLog())
    runners: list[web.AppRunner] = []
    try:
        public = await start_runner(app, settings, public=True)
        runners.append(public)
        await web.TCPSite(
            public, settings.gateway_host, settings.gateway_http_port, reuse_port=reuse_port
        ).start()
        logger.info("listening on http://%s:%d", settings.gateway_host, settings.gateway_http_port)
        if admin:
            admin_runner = await start_runner(create_admin_app(metrics), settings, public=False)
            runners.append(admin_runner)
            await web.TCPSite(
                admin_runner, settings.gateway_admin_host, settings.gateway_admin_port
            ).start()
            logger.info(
                "admin (metrics) on http://%s:%d/metrics",
                settings.gateway_admin_host,
                settings.gateway_admin_port,
            )
        await stop.wait()
        logger.info(
            "draining: %d request(s) in flight, up to %g s",
            lifecycle.inflight,
            settings.gateway_drain_seconds,
        )
        lifecycle.draining = True  # /readyz 503 and `Connection: close` from here on
        if public.server is not None:
            public.server.pre_shutdown()  # idle keep-alive connections close now
        if not await lifecycle.drain(settings.gateway_drain_seconds):
            logger.warning("drain time over; cutting %d request(s)", lifecycle.inflight)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
