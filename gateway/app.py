"""create_app(settings): the gateway's wiring. No I/O until the app starts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from redis.exceptions import RedisError

from gateway.edge import make_edge_middleware
from gateway.keys import lifecycle_key, proxy_key, redis_key, settings_key
from gateway.lifecycle import Lifecycle
from gateway.metrics import Metrics, metrics_key
from gateway.proxy import Proxy
from gateway.redis import redis_ctx
from gateway.settings import GatewaySettings
from gateway.tokens import JWKSUnavailable, TokenVerifier
from pixelcraft.boot import DependencyUnavailable

logger = logging.getLogger(__name__)

READY_TIMEOUT = 2.0


async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers (dependencies are /readyz's business)."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready: not draining, Redis answers PING, the upstream answers its /healthz."""
    app = request.app
    if app[lifecycle_key].draining:
        return web.json_response({"status": "draining"}, status=503)
    checks = {"redis": "ok", "upstream": "ok"}
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await app[redis_key].ping()
    except (RedisError, OSError, TimeoutError):
        checks["redis"] = "unreachable"
    proxy = app[proxy_key]
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            async with proxy.session.get(f"{proxy.base}/healthz") as resp:
                if resp.status != 200:
                    checks["upstream"] = f"status {resp.status}"
    except (aiohttp.ClientError, TimeoutError):
        checks["upstream"] = "unreachable"
    ready = all(v == "ok" for v in checks.values())
    return web.json_response({"status": "ready" if ready else "unavailable", **checks},
                             status=200 if ready else 503)  # fmt: skip


async def proxy_ctx(app: web.Application) -> AsyncIterator[None]:
    """The shared upstream session; an unreachable upstream at boot is only a warning."""
    proxy = app[proxy_key]
    session = proxy.open()
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            async with session.get(f"{proxy.base}/healthz") as resp:
                await resp.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        logger.warning("upstream %s not reachable at boot (%s); serving anyway", proxy.base, exc)
    yield
    await session.close()


async def tokens_ctx(app: web.Application) -> AsyncIterator[None]:
    """JWT mode: the token verifier and its key set (a JWKS file that cannot load is fatal)."""
    settings = app[settings_key]
    proxy = app[proxy_key]
    verifier = TokenVerifier(
        secret=settings.gateway_jwt_secret.get_secret_value()
        if settings.gateway_jwt_secret
        else None,
        jwks_url=settings.gateway_jwks_url,
        jwks_file=settings.gateway_jwks_file,
        audience=settings.gateway_jwt_audience,
        issuer=settings.gateway_jwt_issuer,
        session=proxy.session,
    )
    try:
        await verifier.start()
    except JWKSUnavailable as exc:
        raise DependencyUnavailable(f"GATEWAY_JWKS_FILE: {exc}") from exc
    proxy.verifier = verifier
    yield
    proxy.verifier = None
    await verifier.close()


def create_app(settings: GatewaySettings, metrics: Metrics | None = None) -> web.Application:
    """The public app; `metrics` is shared with the admin app that serves it."""
    metrics = metrics if metrics is not None else Metrics()
    lifecycle = Lifecycle()
    proxy = Proxy(settings, metrics)
    app = web.Application(
        middlewares=[make_edge_middleware(lifecycle, metrics, settings.gateway_access_log)],
    )
    app[settings_key] = settings
    app[metrics_key] = metrics
    app[lifecycle_key] = lifecycle
    app[proxy_key] = proxy
    app.cleanup_ctx.append(redis_ctx)
    app.cleanup_ctx.append(proxy_ctx)
    if settings.jwt_enabled:
        app.cleanup_ctx.append(tokens_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    return app
