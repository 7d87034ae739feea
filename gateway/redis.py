"""The Redis client: built at startup, checked with bounded backoff, closed on shutdown."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.errors import RedisUnreachable
from gateway.keys import redis_key, settings_key
from pixelcraft.boot import boot_retrying

logger = logging.getLogger(__name__)

# Fail fast on a dead Redis: the limiter has its own fallback, a request must not wait on it.
SOCKET_TIMEOUT = 1.0


def describe(url: str) -> str:
    """Where a Redis URL points, without credentials."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname}:{parts.port or 6379}"


def connect(url: str) -> Redis:
    """A client for `url` (no I/O until first use)."""
    client: Redis = Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        health_check_interval=15,
    )
    return client


async def wait_for_redis(client: Redis, where: str, budget: float) -> None:
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
    client = connect(settings.redis_url)
    try:
        await wait_for_redis(
            client, describe(settings.redis_url), settings.gateway_startup_retry_seconds
        )
    except RedisUnreachable:
        await client.aclose()
        raise
    app[redis_key] = client
    logger.info("Redis ready at %s", describe(settings.redis_url))
    yield
    await client.aclose()
