"""Serving the gateway: listeners, signals, draining.

The public ports are the data plane's (gateway.edge): connection deadlines (header, keep-alive,
body, TLS handshake) are its timers. SIGTERM drains: /readyz turns 503, idle keep-alive
connections close, responses carry `Connection: close`, and requests and streams in flight get
GATEWAY_DRAIN_SECONDS to finish before the process exits 0. SIGHUP runs the reloaders.

With TLS configured the API is served on GATEWAY_HTTPS_PORT (with HSTS) and the HTTP port
answers ACME challenges and redirects everything else to HTTPS; without it the HTTP port serves
the API, plus ACME challenges when GATEWAY_ACME_WEBROOT is set (to get the first certificate).
GATEWAY_HOST 0.0.0.0 or :: listens on both IP families, and 127.0.0.1 or ::1 on both loopback
addresses; the other family's address is best effort (a warning on a host without IPv6).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import ssl
from typing import NamedTuple

from aiohttp import web

from gateway.app import create_app, redirects_to_https
from gateway.edge.plane import DataPlane, Site
from gateway.edge.routes import redirect_routes
from gateway.keys import lifecycle_key, plane_key, routes_key
from gateway.limiting.admin import admin_limits
from gateway.limiting.policies import Policies
from gateway.metrics import Metrics, create_admin_app
from gateway.serving import pidfile
from gateway.settings import GatewaySettings
from gateway.tls.acme import Challenges
from gateway.tls.certificates import ServingCertificate, TLSFileError, check_openssl_conf
from pixelcraft.aio import Tasks, cancel
from pixelcraft.boot import DependencyUnavailable

logger = logging.getLogger(__name__)

# The other IP family's address for the wildcard and loopback hosts.
DUAL_STACK = {"0.0.0.0": "::", "::": "0.0.0.0", "127.0.0.1": "::1", "::1": "127.0.0.1"}


def listen_addresses(host: str) -> list[tuple[str, bool]]:
    """(address, required) pairs to listen on for GATEWAY_HOST."""
    other = DUAL_STACK.get(host)
    return [(host, True)] + ([(other, False)] if other is not None else [])


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


def identity_warning(settings: GatewaySettings) -> str | None:
    """What to warn of at boot about whom the gateway believes, if anything."""
    mode = settings.gateway_user_id_header
    if mode == "any" and not _loopback(settings.gateway_host):
        return (
            f"GATEWAY_USER_ID_HEADER=any while listening on {settings.gateway_host}: any client "
            "can name any user in X-User-Id, and read and delete that user's conversations. "
            "That is for development on loopback; in production use JWT (GATEWAY_JWT_SECRET / "
            "GATEWAY_JWKS_URL) or an authenticating proxy (GATEWAY_USER_ID_HEADER=trusted)"
        )
    return None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Gateway:
    """One gateway process's parts: the app (its resources, started and cleaned up by an
    AppRunner) and the data plane's listeners."""

    def __init__(
        self,
        settings: GatewaySettings,
        policies: Policies | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics()
        self.app = create_app(settings, self.metrics, policies)
        self.plane: DataPlane = self.app[plane_key]
        self.certificate = (
            load_certificate(settings, self.metrics) if settings.tls_enabled else None
        )
        if self.certificate is not None:
            self.app.cleanup_ctx.append(self.certificate.reloading_ctx)
        self.runner = web.AppRunner(self.app, access_log=None)

    async def start(self) -> None:
        """Start the app's resources (Redis, the limiter, ...): DependencyUnavailable if one
        is missing, after closing those that did start."""
        try:
            await self.runner.setup()
        except BaseException:
            await self.app.cleanup()  # the contexts that did start close what they opened
            raise

    def api_site(self, *, tls: bool) -> Site:
        return Site(self.app[routes_key], tls=tls)

    async def listen(self, *, reuse_port: bool) -> None:
        """The public listeners GATEWAY_* asks for."""
        settings = self.settings
        host = settings.gateway_host
        if self.certificate is not None:
            await self._listen(
                self.api_site(tls=True),
                host,
                settings.gateway_https_port,
                reuse_port,
                self.certificate.listening,
            )
        if redirects_to_https(settings):
            challenges = Challenges(settings.gateway_acme_webroot)
            routes = redirect_routes(challenges, settings.gateway_https_port)
            http = Site(routes, tls=False)
        else:
            http = self.api_site(tls=False)
        await self._listen(http, host, settings.gateway_http_port, reuse_port, None)
        warning = identity_warning(settings)
        if warning is not None:
            logger.warning("%s", warning)

    async def _listen(
        self,
        site: Site,
        host: str,
        port: int,
        reuse_port: bool,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        scheme = "https" if ssl_context is not None else "http"
        for address, required in listen_addresses(host):
            try:
                await self.plane.listen(
                    site, address, port, ssl_context=ssl_context, reuse_port=reuse_port
                )
            except OSError as exc:
                if required:
                    raise
                logger.warning("not listening on %s port %d as well: %s", address, port, exc)
                continue
            shown = f"[{address}]" if ":" in address else address
            logger.info("listening on %s://%s:%d", scheme, shown, port)

    def start_draining(self) -> None:
        """SIGTERM, at once: not ready any more, idle connections closed, `Connection: close`."""
        if self.plane.draining:
            return
        lifecycle = self.app[lifecycle_key]
        seconds = self.settings.gateway_drain_seconds
        logger.info("draining: %d request(s) in flight, up to %g s", lifecycle.inflight, seconds)
        self.plane.drain()

    async def drain(self) -> None:
        """Let what is in flight finish (within the drain time)."""
        self.start_draining()
        lifecycle = self.app[lifecycle_key]
        if not await lifecycle.drain(self.settings.gateway_drain_seconds):
            logger.warning("drain time over; cutting %d request(s)", lifecycle.inflight)

    async def close(self) -> None:
        await self.plane.close()
        await self.runner.cleanup()


async def watch_parent(parent: int, stop: asyncio.Event, interval: float = 1.0) -> None:
    """Set `stop` once this process's parent is no longer `parent` (it died: we were
    re-parented). Polled: PR_SET_PDEATHSIG does not survive uvloop's way of spawning."""
    while os.getppid() == parent:  # noqa: ASYNC110  (no event tells a process its parent died)
        await asyncio.sleep(interval)
    logger.warning("the supervisor (pid %d) is gone; draining", parent)
    stop.set()


class Worker(NamedTuple):
    """One of GATEWAY_WORKERS processes under the supervisor: which, and where its metrics go."""

    number: int
    metrics_dir: str


async def serve(
    settings: GatewaySettings, policies: Policies | None = None, *, worker: Worker | None = None
) -> None:
    """Run one gateway process until SIGTERM/SIGINT (drained); SIGHUP reloads. A worker
    shares its ports (SO_REUSEPORT) and leaves the admin port and pid file to the supervisor."""
    metrics = Metrics(multiprocess_dir=worker.metrics_dir if worker is not None else None)
    gateway = Gateway(settings, policies, metrics)
    reuse_port = admin = False
    if worker is None:
        admin = True
    else:
        reuse_port = True
        logger.info("worker %d (pid %d)", worker.number, os.getpid())
    lifecycle = gateway.app[lifecycle_key]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def terminate() -> None:
        if gateway.plane.servers:  # serving: the drain starts in this very callback
            gateway.start_draining()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, terminate)
    reloads = Tasks("reloads")
    loop.add_signal_handler(signal.SIGHUP, lambda: reloads.spawn(lifecycle.reload()))
    admin_runner: web.AppRunner | None = None
    orphaned: asyncio.Task[None] | None = None
    started = False
    try:
        await gateway.start()
        started = True
        await gateway.listen(reuse_port=reuse_port)
        if admin:
            admin_runner = web.AppRunner(
                create_admin_app(gateway.metrics, admin_limits(settings)), access_log=None
            )
            await admin_runner.setup()
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
        await gateway.drain()
    finally:
        await cancel(orphaned)
        await reloads.close()
        if admin and settings.gateway_pid_file is not None:
            pidfile.remove(settings.gateway_pid_file)
        if admin_runner is not None:
            await admin_runner.cleanup()
        if started:
            await gateway.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
