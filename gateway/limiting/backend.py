"""The Redis client: built at startup, checked with bounded backoff, closed on shutdown.

One Redis (`redis://`, `rediss://` for TLS, `unix://`), a Redis Cluster (GATEWAY_REDIS_CLUSTER:
REDIS_URL names any node) or a Sentinel-managed primary (GATEWAY_REDIS_SENTINELS: REDIS_URL then
gives only the credentials, database and TLS); redis-py follows failovers and slot moves.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from gateway.errors import RedisUnreachable
from gateway.keys import redis_key, settings_key
from gateway.settings import GatewaySettings
from pixelcraft.boot import boot_retrying

logger = logging.getLogger(__name__)

# Fail fast on a dead Redis: the limiter has its own fallback, a request must not wait on it.
SOCKET_TIMEOUT = 1.0


def describe(settings: GatewaySettings) -> str:
    """Where Redis is, without credentials."""
    if settings.gateway_redis_sentinels:
        return f"sentinel service {settings.gateway_redis_sentinel_service} via " + ",".join(
            settings.gateway_redis_sentinels
        )
    parts = urlsplit(settings.redis_url)
    where = parts.path if parts.scheme == "unix" else f"{parts.hostname}:{parts.port or 6379}"
    return f"cluster node {where}" if settings.gateway_redis_cluster else where


def connect(settings: GatewaySettings) -> Redis | RedisCluster:
    """A client for the configured deployment (no I/O until first use)."""
    url = settings.redis_url
    timeouts: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": SOCKET_TIMEOUT,
    }
    if settings.gateway_redis_cluster:
        cluster: RedisCluster = RedisCluster.from_url(url, **timeouts)
        return cluster
    if settings.gateway_redis_sentinels:
        given = parse_url(url)
        auth: dict[str, Any] = {k: given[k] for k in ("username", "password", "db") if k in given}  # type: ignore[literal-required]
        sentinel = Sentinel(settings.sentinels, sentinel_kwargs=dict(timeouts), **timeouts)
        primary: Redis = sentinel.master_for(
            settings.gateway_redis_sentinel_service,
            ssl=url.startswith("rediss://"),
            health_check_interval=15,
            **auth,
        )
        return primary
    client: Redis = Redis.from_url(url, health_check_interval=15, **timeouts)
    return client


async def close(client: Redis | RedisCluster) -> None:
    """Close the client, and with Sentinel the connections to the sentinels too."""
    manager = getattr(client.connection_pool, "sentinel_manager", None) if isinstance(
        client, Redis) else None  # fmt: skip
    await client.aclose()
    if manager is not None:
        for sentinel in manager.sentinels:
            await sentinel.aclose()


async def wait_for_redis(client: Redis | RedisCluster, where: str, budget: float) -> None:
    """PING with exponential backoff for up to `budget` seconds, else RedisUnreachable."""
    try:
        async for attempt in boot_retrying(f"Redis at {where}", budget, (RedisError, OSError)):
            with attempt:
                await client.ping()
    except (RedisError, OSError) as exc:
        raise RedisUnreachable(f"Redis at {where} unreachable (REDIS_URL): {exc}") from exc


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context owning the Redis client."""
    settings = app[settings_key]
    client = connect(settings)
    where = describe(settings)
    try:
        await wait_for_redis(client, where, settings.gateway_startup_retry_seconds)
    except RedisUnreachable:
        await close(client)
        raise
    app[redis_key] = client
    logger.info("Redis ready at %s", where)
    yield
    await close(client)
