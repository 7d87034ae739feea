"""The asyncpg pool: built at startup (after migrations), closed on shutdown.

Every use goes through `acquire()`, which turns an exhausted pool or a database that is down into
`DatabaseUnavailable` (503 with Retry-After), so a request never hangs on PostgreSQL and the
service recovers by itself once the database is back: asyncpg replaces a pooled connection that
died on its next acquire.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast
from urllib.parse import urlsplit

import asyncpg
from aiohttp import web

from pixelcraft.boot import DependencyUnavailable, boot_retrying
from upstream.errors import DatabaseUnavailable
from upstream.keys import pool_key, settings_key
from upstream.migrations import migrate
from upstream.settings import UpstreamSettings

logger = logging.getLogger(__name__)

# What a database that is down, restarting or unreachable raises (as opposed to a bad query).
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    # A pooled connection whose server just shut down (FATAL 57P01 read, EOF not yet) fails
    # its next query with "cannot switch to state ..." instead of a connection error.
    asyncpg.InternalClientError,
)

CONNECT_TIMEOUT = 5.0


class DatabaseUnreachable(DependencyUnavailable):
    """PostgreSQL did not answer at boot within the retry budget."""


def describe(url: str) -> str:
    """`host:port/dbname` of a database URL, without user or password."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or '/'}"


@asynccontextmanager
async def acquire(pool: asyncpg.Pool, timeout: float) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection, or DatabaseUnavailable when none comes within `timeout`."""
    try:
        async with pool.acquire(timeout=timeout) as proxy:
            # The pool hands out a transparent proxy of a Connection.
            yield cast(asyncpg.Connection, proxy)
    except TimeoutError as exc:
        raise DatabaseUnavailable(
            "the database is busy: no connection became free in time", retry_after=1
        ) from exc
    except UNAVAILABLE as exc:
        raise DatabaseUnavailable("the database is unavailable", retry_after=2) from exc


async def create_pool(settings: UpstreamSettings) -> asyncpg.Pool:
    """Connect (retrying with backoff for the boot budget), migrate, and return the pool."""
    where = describe(settings.database_url)
    retrying = boot_retrying(
        f"PostgreSQL at {where}", settings.upstream_startup_retry_seconds, UNAVAILABLE
    )
    try:
        async for attempt in retrying:
            with attempt:
                conn = await asyncpg.connect(
                    settings.database_url,
                    timeout=CONNECT_TIMEOUT,
                    statement_cache_size=settings.db_statement_cache_size,
                )
                try:
                    await migrate(conn)
                finally:
                    await conn.close()
    except UNAVAILABLE as exc:
        raise DatabaseUnreachable(f"PostgreSQL at {where} unreachable: {exc}") from exc
    pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=settings.db_pool_min_size,
        max_size=settings.db_pool_max_size,
        statement_cache_size=settings.db_statement_cache_size,
        timeout=CONNECT_TIMEOUT,
        max_inactive_connection_lifetime=300.0,
        server_settings={"application_name": "pixelcraft-upstream"},
    )
    assert pool is not None
    logger.info(
        "PostgreSQL pool ready at %s (min %d, max %d)",
        where,
        settings.db_pool_min_size,
        settings.db_pool_max_size,
    )
    return pool


async def pool_ctx(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context owning the pool."""
    pool = await create_pool(app[settings_key])
    app[pool_key] = pool
    yield
    try:
        await asyncio.wait_for(pool.close(), timeout=10)
    except TimeoutError:
        logger.warning("PostgreSQL pool did not close in 10 s; terminating connections")
        pool.terminate()
