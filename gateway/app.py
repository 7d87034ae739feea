"""create_app(settings): the gateway's wiring. No I/O until the app starts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from importlib.metadata import version
from typing import Any

import aiohttp
from aiohttp import web
from redis.exceptions import RedisError

from gateway.accesslog import AccessLog
from gateway.edge import make_edge
from gateway.keys import (
    access_log_key,
    api_document_key,
    lifecycle_key,
    limiter_key,
    policies_key,
    proxy_key,
    redis_key,
    settings_key,
)
from gateway.lifecycle import Lifecycle, ReloadFailed
from gateway.metrics import Metrics, metrics_key, multiprocess_dir
from gateway.openapi import ApiDocument
from gateway.policies import Policies, PolicyError, load_policies
from gateway.proxy import Proxy
from gateway.ratelimit import Limiter
from gateway.redis import describe, redis_ctx
from gateway.settings import GatewaySettings
from gateway.tokens import JWKSUnavailable, TokenVerifier
from pixelcraft.aio import cancel
from pixelcraft.boot import DependencyUnavailable
from pixelcraft.openapi import add_docs, build_spec, documented

logger = logging.getLogger(__name__)

VERSION = version("pixelcraft-gateway")
DESCRIPTION = (
    "PixelCraft: an AI chat API. Every call goes through this gateway, which identifies the "
    "caller (bearer JWT, else `X-User-Id`, else the client address), rate-limits per user and "
    "per address (each operation's `x-ratelimit` and description say how much; every response "
    "carries `RateLimit` and `RateLimit-Policy`; a denial is a 429 problem with `Retry-After`), "
    "and streams the chat service's answers through unbuffered."
)

READY_TIMEOUT = 2.0


STATUS = {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}
READY = {
    "type": "object",
    "properties": {
        "status": {"type": "string", "enum": ["ready", "unavailable", "draining"]},
        "redis": {"type": "string", "example": "ok"},
        "upstream": {"type": "string", "example": "ok"},
    },
    "required": ["status"],
}


@documented(
    tags=["operations"],
    summary="Liveness of the gateway",
    description="200 while the gateway process answers. Not rate limited.",
    responses={
        "200": {"description": "Alive.", "content": {"application/json": {"schema": STATUS}}}
    },
)
async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers (dependencies are /readyz's business)."""
    return web.json_response({"status": "ok"})


@documented(
    tags=["operations"],
    summary="Readiness of the gateway",
    description="200 when Redis answers PING and the upstream its /healthz; 503 otherwise, and "
    "while draining after SIGTERM. Not rate limited.",
    responses={
        "200": {"description": "Ready.", "content": {"application/json": {"schema": READY}}},
        "503": {"description": "Not ready.", "content": {"application/json": {"schema": READY}}},
    },
)
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


async def limiter_ctx(app: web.Application) -> AsyncIterator[None]:
    """The rate limiter on the shared Redis client; its policies reload on SIGHUP."""
    settings = app[settings_key]
    metrics = app[metrics_key]
    limiter = Limiter(
        app[redis_key],
        app[policies_key],
        metrics,
        prefix=settings.gateway_redis_key_prefix,
        timeout=settings.gateway_ratelimit_timeout_ms / 1000,
        divisor=settings.gateway_ratelimit_replicas * settings.gateway_workers,
        lease_seconds=settings.gateway_ratelimit_lease_seconds,
    )
    try:
        await limiter.start()
    except (RedisError, OSError) as exc:
        raise DependencyUnavailable(
            f"Redis at {describe(settings)} refuses the rate-limit script: {exc}"
        ) from exc

    async def reload() -> None:
        try:
            policies = load_policies(
                settings.gateway_ratelimit_config, settings.gateway_ratelimit_failure_mode
            )
        except PolicyError as exc:
            metrics.ratelimit_policy_reloads.labels("error").inc()
            raise ReloadFailed(str(exc)) from exc
        limiter.use(policies)
        metrics.ratelimit_policy_reloads.labels("ok").inc()
        logger.info("rate-limit policies: %s", summary(policies))

    app[limiter_key] = limiter
    app[lifecycle_key].reloaders.append(("rate-limit policies", reload))
    app[proxy_key].limiter = limiter
    logger.info("rate-limit policies: %s", summary(limiter.policies))
    yield
    app[proxy_key].limiter = None
    await limiter.close()


def summary(policies: Policies) -> str:
    """One log line: every policy's name, rate, burst and cost."""
    return ", ".join(
        f"{p.name}={p.rate_text} burst {p.burst}" + (f" cost {p.cost}" if p.cost != 1 else "")
        for p in policies.all()
    )


@documented(
    tags=["operations"],
    summary="This document",
    description="The merged OpenAPI 3 document: the gateway's operations and the chat "
    "service's, each annotated with the rate limits in force (`x-ratelimit`).",
    responses={"200": {"description": "OpenAPI 3.0.", "content": {"application/json": {}}}},
)
async def openapi(request: web.Request) -> web.Response:
    """GET /openapi.json: served from memory, never waiting on the upstream."""
    app = request.app
    limiter = app.get(limiter_key)
    body = app[api_document_key].render(limiter.policies if limiter is not None else None)
    return web.Response(body=body, content_type="application/json")


async def openapi_ctx(app: web.Application) -> AsyncIterator[None]:
    """The upstream's document: fetched once at boot (a failure is only a warning), then
    refreshed in the background."""
    settings = app[settings_key]
    proxy = app[proxy_key]

    async def fetch() -> dict[str, Any]:
        async with asyncio.timeout(READY_TIMEOUT):
            async with proxy.session.get(f"{proxy.base}/openapi.json") as resp:
                resp.raise_for_status()
                document: dict[str, Any] = await resp.json(content_type=None)
                return document

    document = ApiDocument(
        build_spec(app, title="PixelCraft API", version=VERSION, description=DESCRIPTION),
        fetch,
        jwt=settings.jwt_enabled,
        public_url=settings.gateway_public_url,
        max_body=settings.gateway_max_body_bytes,
        refresh=settings.gateway_openapi_refresh_seconds,
    )
    app[api_document_key] = document
    await document.update()
    document.start()
    yield
    await document.close()


async def inflight_ctx(app: web.Application) -> AsyncIterator[None]:
    """Worker processes push their in-flight count each second (see Metrics.track_inflight)."""
    metrics = app[metrics_key]

    async def push() -> None:
        while True:
            metrics.push_inflight()
            await asyncio.sleep(1.0)

    task = asyncio.get_running_loop().create_task(push())
    yield
    await cancel(task)


async def access_log_ctx(app: web.Application) -> AsyncIterator[None]:
    access_log = app[access_log_key]
    access_log.start()
    yield
    access_log.close()


def create_app(
    settings: GatewaySettings, metrics: Metrics | None = None, policies: Policies | None = None
) -> web.Application:
    """The public app; `metrics` is shared with the admin app that serves it. `policies`
    default to GATEWAY_RATELIMIT_CONFIG's (PolicyError if that file is unusable)."""
    metrics = metrics if metrics is not None else Metrics()
    lifecycle = Lifecycle()
    metrics.track_inflight(lambda: lifecycle.inflight)
    proxy = Proxy(settings, metrics)
    access_log = AccessLog(settings.gateway_log_format) if settings.gateway_access_log else None
    edge = make_edge(lifecycle, metrics, access_log)
    app = web.Application()
    if access_log is not None:
        app[access_log_key] = access_log
        app.cleanup_ctx.append(access_log_ctx)
    app[settings_key] = settings
    app[metrics_key] = metrics
    app[lifecycle_key] = lifecycle
    app[proxy_key] = proxy
    if multiprocess_dir() is not None:
        app.cleanup_ctx.append(inflight_ctx)
    app.cleanup_ctx.append(redis_ctx)
    app.cleanup_ctx.append(proxy_ctx)
    if settings.gateway_ratelimit_enabled:
        if policies is None:
            policies = load_policies(
                settings.gateway_ratelimit_config, settings.gateway_ratelimit_failure_mode
            )
        app[policies_key] = policies
        app.cleanup_ctx.append(limiter_ctx)
    else:
        logger.warning("rate limiting is off (GATEWAY_RATELIMIT_ENABLED=false)")
    if settings.jwt_enabled:
        app.cleanup_ctx.append(tokens_ctx)
    app.router.add_get("/healthz", edge(healthz, "/healthz"))
    app.router.add_get("/readyz", edge(readyz, "/readyz"))
    app.router.add_get("/openapi.json", edge(openapi, "/openapi.json"))
    add_docs(app, title="PixelCraft API", wrap=edge)
    app.cleanup_ctx.append(openapi_ctx)
    app.router.add_route("*", "/{tail:.*}", edge(proxy.handle, None))
    return app
