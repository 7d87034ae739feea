"""Serving the gateway: listeners, connection deadlines, signals, draining.

aiohttp has no deadline for reading a request's headers (a slowloris connection stays open
for as long as the keep-alive timeout allows), so the first request on a connection must arrive
whole within GATEWAY_HEADER_TIMEOUT; later ones within GATEWAY_KEEPALIVE_TIMEOUT of the previous
response, which aiohttp enforces itself. SIGTERM drains: /readyz turns 503, idle keep-alive
connections close, responses carry `Connection: close`, and requests and streams in flight get
GATEWAY_DRAIN_SECONDS to finish before the process exits 0. SIGHUP runs the reloaders.

With TLS configured the public app is served on GATEWAY_HTTPS_PORT (with HSTS) and the HTTP port
answers ACME challenges and redirects everything else to HTTPS (gateway.acme); without it the
HTTP port serves the public app, plus ACME challenges when GATEWAY_ACME_WEBROOT is set (to get the
first certificate). GATEWAY_HOST 0.0.0.0 or :: listens on both IP families, and 127.0.0.1 or ::1
on both loopback addresses; the other family's address is best effort (a warning on a host
without IPv6).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import time
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from gateway import pidfile
from gateway.acme import Challenges, add_challenge_route, create_http_app
from gateway.app import create_app
from gateway.edge import make_edge
from gateway.keys import access_log_key, lifecycle_key
from gateway.metrics import Metrics, create_admin_app, metrics_key
from gateway.policies import Policies
from gateway.settings import GatewaySettings
from gateway.tls import HSTS, ServingCertificate, TLSFileError, check_openssl_conf
from pixelcraft.boot import DependencyUnavailable

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


# The other IP family's address for the wildcard and loopback hosts.
DUAL_STACK = {"0.0.0.0": "::", "::": "0.0.0.0", "127.0.0.1": "::1", "::1": "127.0.0.1"}


def listen_addresses(host: str) -> list[tuple[str, bool]]:
    """(address, required) pairs to listen on for GATEWAY_HOST."""
    other = DUAL_STACK.get(host)
    return [(host, True)] + ([(other, False)] if other is not None else [])


async def start_sites(
    runner: web.AppRunner,
    host: str,
    port: int,
    *,
    reuse_port: bool,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    scheme = "https" if ssl_context is not None else "http"
    for address, required in listen_addresses(host):
        site = web.TCPSite(runner, address, port, ssl_context=ssl_context, reuse_port=reuse_port)
        try:
            await site.start()
        except OSError as exc:
            if required:
                raise
            await site.stop()
            logger.warning("not listening on %s port %d as well: %s", address, port, exc)
            continue
        shown = f"[{address}]" if ":" in address else address
        logger.info("listening on %s://%s:%d", scheme, shown, port)


async def add_hsts(request: web.Request, response: web.StreamResponse) -> None:
    """RFC 6797 §7.1: HTTPS responses carry Strict-Transport-Security (never HTTP ones)."""
    if request.secure:
        response.headers["Strict-Transport-Security"] = HSTS


def load_certificate(settings: GatewaySettings, metrics: Metrics) -> ServingCertificate:
    """The boot check: the pair loads, matches and has not expired, else exit 69 naming the
    file (DependencyUnavailable)."""
    assert settings.gateway_tls_cert_file is not None
    assert settings.gateway_tls_key_file is not None
    certificate = ServingCertificate(
        settings.gateway_tls_cert_file,
        settings.gateway_tls_key_file,
        metrics,
        settings.gateway_tls_poll_seconds,
    )
    try:
        certificate.load()
    except TLSFileError as exc:
        raise DependencyUnavailable(f"cannot serve HTTPS: {exc}") from exc
    check_openssl_conf()
    return certificate


async def watch_parent(parent: int, stop: asyncio.Event, interval: float = 1.0) -> None:
    """Set `stop` once this process's parent is no longer `parent` (it died: we were
    re-parented). Polled: PR_SET_PDEATHSIG does not survive uvloop's way of spawning."""
    while os.getppid() == parent:  # noqa: ASYNC110  (no event tells a process its parent died)
        await asyncio.sleep(interval)
    logger.warning("the supervisor (pid %d) is gone; draining", parent)
    stop.set()


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
    edge = make_edge(lifecycle, app[metrics_key], app.get(access_log_key))
    challenges = Challenges(settings.gateway_acme_webroot)
    certificate = load_certificate(settings, metrics) if settings.tls_enabled else None
    # With TLS, the HTTP port redirects to HTTPS (its own little app) unless told not to.
    redirect = certificate is not None and settings.gateway_https_redirect
    if certificate is not None:
        app.on_response_prepare.append(add_hsts)
        app.cleanup_ctx.append(certificate.reloading_ctx)
    if not redirect and settings.gateway_acme_webroot is not None:
        add_challenge_route(app, challenges, edge)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(lifecycle.reload()))
    logging.getLogger("aiohttp.server").addFilter(MalformedRequestLog())
    runners: list[web.AppRunner] = []
    orphaned: asyncio.Task[None] | None = None
    try:
        public = await start_runner(app, settings, public=True)
        runners.append(public)
        http = public
        if certificate is not None:
            await start_sites(
                public,
                settings.gateway_host,
                settings.gateway_https_port,
                reuse_port=reuse_port,
                ssl_context=certificate.listening,
            )
        if redirect:
            http_app = create_http_app(challenges, settings.gateway_https_port, edge)
            http = await start_runner(http_app, settings, public=True)
            runners.append(http)
        await start_sites(
            http, settings.gateway_host, settings.gateway_http_port, reuse_port=reuse_port
        )
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
        if admin and settings.gateway_pid_file is not None:
            pidfile.write(settings.gateway_pid_file)
        if reuse_port:  # a worker: its supervisor gone (even by SIGKILL), it drains and exits
            orphaned = loop.create_task(watch_parent(os.getppid(), stop))
        await stop.wait()
        logger.info(
            "draining: %d request(s) in flight, up to %g s",
            lifecycle.inflight,
            settings.gateway_drain_seconds,
        )
        lifecycle.draining = True  # /readyz 503 and `Connection: close` from here on
        for runner in {public, http}:
            if runner.server is not None:
                runner.server.pre_shutdown()  # idle keep-alive connections close now
        if not await lifecycle.drain(settings.gateway_drain_seconds):
            logger.warning("drain time over; cutting %d request(s)", lifecycle.inflight)
    finally:
        if orphaned is not None:
            orphaned.cancel()
        if admin and settings.gateway_pid_file is not None:
            pidfile.remove(settings.gateway_pid_file)
        for runner in reversed(runners):
            await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
