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

from gateway.auth.tokens import JWKSUnavailable, TokenVerifier
from gateway.edge.accesslog import AccessLog
from gateway.edge.plane import DataPlane
from gateway.edge.routes import operations, public_routes
from gateway.keys import (
    access_log_key,
    api_document_key,
    lifecycle_key,
    limiter_key,
    plane_key,
    policies_key,
    redis_key,
    routes_key,
    settings_key,
)
from gateway.limiting.backend import describe, redis_ctx
from gateway.limiting.limiter import Limiter
from gateway.limiting.overrides import Overrides, OverrideStore
from gateway.limiting.policies import Policies, PolicyError, load_policies
from gateway.metrics import Metrics, metrics_key
from gateway.openapi import ApiDocument
from gateway.serving.lifecycle import Lifecycle, ReloadFailed
from gateway.settings import GatewaySettings
from gateway.tls.acme import Challenges
from pixelcraft.aio import cancel
from pixelcraft.boot import DependencyUnavailable
from pixelcraft.openapi import build_spec

logger = logging.getLogger(__name__)

VERSION = version("pixelcraft-gateway")
DESCRIPTION = (
    "PixelCraft: an AI chat API. Every call goes through this gateway, which identifies the "
    "caller (a bearer JWT, else an `X-User-Id` from a proxy it trusts, else the client address), "
    "rate-limits per user and "
    "per address (each operation's `x-ratelimit` and description say how much; every response "
    "carries `RateLimit` and `RateLimit-Policy`; a denial is a 429 problem with `Retry-After`), "
    "and streams the chat service's answers through unbuffered."
)

READY_TIMEOUT = 2.0
TITLE = "PixelCraft API"


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    """The outbound HTTP client (JWKS, the upstream's OpenAPI document, /readyz's upstream
    check); an upstream unreachable at boot is only a warning."""
    plane = app[plane_key]
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, connect=READY_TIMEOUT, sock_read=READY_TIMEOUT)
    )
    plane.session = session
    plane.redis = app[redis_key]  # for /readyz
    health = await plane.upstream_health(READY_TIMEOUT)
    if health != "ok":
        logger.warning("upstream %s not ready at boot (%s); serving anyway", plane.upstream_url,
                       health)  # fmt: skip
    yield
    plane.session = None
    await session.close()


async def plane_ctx(app: web.Application) -> AsyncIterator[None]:
    """The data plane's upstream pool closes with the app."""
    yield
    await app[plane_key].close()


async def tokens_ctx(app: web.Application) -> AsyncIterator[None]:
    """JWT mode: the token verifier and its key set (a JWKS file that cannot load is fatal)."""
    settings = app[settings_key]
    plane = app[plane_key]
    verifier = TokenVerifier(
        secret=settings.gateway_jwt_secret.get_secret_value()
        if settings.gateway_jwt_secret
        else None,
        jwks_url=settings.gateway_jwks_url,
        jwks_file=settings.gateway_jwks_file,
        audience=settings.gateway_jwt_audience,
        issuer=settings.gateway_jwt_issuer,
        session=plane.session,
    )
    try:
        await verifier.start()
    except JWKSUnavailable as exc:
        raise DependencyUnavailable(f"GATEWAY_JWKS_FILE: {exc}") from exc
    plane.verifier = verifier
    yield
    plane.verifier = None
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
    overrides = Overrides(
        OverrideStore(app[redis_key], settings.gateway_redis_key_prefix),
        settings.gateway_ratelimit_overrides_refresh_seconds,
        on_load=metrics.ratelimit_overrides.set,
    )
    await overrides.start()  # a failure is a warning: overrides apply once Redis answers
    limiter.overrides = overrides

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
    app[plane_key].limiter = limiter
    logger.info("rate-limit policies: %s", summary(limiter.policies))
    yield
    app[plane_key].limiter = None
    await overrides.close()
    await limiter.close()


def summary(policies: Policies) -> str:
    """One log line: every policy's name, rate, burst and cost."""
    return ", ".join(
        f"{p.name}={p.rate_text} burst {p.burst}" + (f" cost {p.cost}" if p.cost != 1 else "")
        for p in policies.all()
    )


async def openapi_ctx(app: web.Application) -> AsyncIterator[None]:
    """The upstream's document: fetched once at boot (a failure is only a warning), then
    refreshed in the background."""
    settings = app[settings_key]
    plane = app[plane_key]
    session = plane.session
    assert session is not None, "session_ctx runs first"

    async def fetch() -> dict[str, Any]:
        async with asyncio.timeout(READY_TIMEOUT):
            async with session.get(f"{plane.upstream_url}/openapi.json") as resp:
                resp.raise_for_status()
                document: dict[str, Any] = await resp.json(content_type=None)
                return document

    document = ApiDocument(
        build_spec(
            operations(app[routes_key]), title=TITLE, version=VERSION, description=DESCRIPTION
        ),
        fetch,
        jwt=settings.jwt_enabled,
        public_url=settings.gateway_public_url,
        max_body=settings.gateway_max_body_bytes,
        refresh=settings.gateway_openapi_refresh_seconds,
        on_paths=app[metrics_key].use_routes,
    )
    app[api_document_key] = document
    await document.update()
    document.start()
    plane.api_document = document
    yield
    plane.api_document = None
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
    """The gateway's composition root: its resources as cleanup contexts, its data plane
    (gateway.edge) under `plane_key`, listening once gateway.serving.server says so. `metrics` is
    shared with the admin app that serves it. `policies` default to GATEWAY_RATELIMIT_CONFIG's
    (PolicyError if that file is unusable)."""
    metrics = metrics if metrics is not None else Metrics()
    lifecycle = Lifecycle()
    metrics.track_inflight(lambda: lifecycle.inflight)
    access_log = AccessLog(settings.gateway_log_format) if settings.gateway_access_log else None
    plane = DataPlane(settings, metrics, lifecycle, access_log)
    app = web.Application()
    if access_log is not None:
        app[access_log_key] = access_log
        app.cleanup_ctx.append(access_log_ctx)
    app[settings_key] = settings
    app[metrics_key] = metrics
    app[lifecycle_key] = lifecycle
    app[plane_key] = plane
    app[routes_key] = public_routes(TITLE, challenges_on_api_port(settings))
    if metrics.multiprocess_dir is not None:
        app.cleanup_ctx.append(inflight_ctx)
    app.cleanup_ctx.append(plane_ctx)
    app.cleanup_ctx.append(redis_ctx)
    app.cleanup_ctx.append(session_ctx)
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
    app.cleanup_ctx.append(openapi_ctx)
    return app


def redirects_to_https(settings: GatewaySettings) -> bool:
    """With TLS, the HTTP port redirects to HTTPS (and serves challenges) unless told not to."""
    return settings.tls_enabled and settings.gateway_https_redirect


def challenges_on_api_port(settings: GatewaySettings) -> Challenges | None:
    """TLS off (or no redirect) with GATEWAY_ACME_WEBROOT set: challenges sit beside the API,
    to get the first certificate."""
    if settings.gateway_acme_webroot is None or redirects_to_https(settings):
        return None
    return Challenges(settings.gateway_acme_webroot)
