"""The chat service survives PostgreSQL going away and coming back, without a restart.

Uses a PostgreSQL of its own (never the shared one), stopped and started by the test.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from devtools.services import PostgresServer, find_postgres_bindir
from tests.conftest import wait_until
from tests.upstream.conftest import UpstreamFactory
from upstream.app import create_app

pytestmark = pytest.mark.skipif(find_postgres_bindir() is None, reason="no PostgreSQL binaries")


@pytest.fixture(scope="module")
def own_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    with PostgresServer(tmp_path_factory.mktemp("own-postgres")) as server:
        yield server


async def test_requests_fail_cleanly_while_down_and_recover(
    own_postgres: PostgresServer, make_upstream: UpstreamFactory
) -> None:
    url = own_postgres.create_database(f"restart_{uuid.uuid4().hex[:8]}")
    client = await make_upstream(
        database_url=url, db_pool_min_size=2, db_pool_max_size=4, db_pool_acquire_timeout=1
    )
    alice = {"X-User-Id": "alice"}
    resp = await client.post("/v1/chat", json={"message": "before", "stream": False}, headers=alice)
    assert resp.status == 200

    own_postgres.stop()
    for path in ("/v1/conversations", "/readyz"):
        resp = await client.get(path, headers=alice)
        assert resp.status == 503, path
    resp = await client.post("/v1/chat", json={"message": "while down"}, headers=alice)
    assert resp.status == 503 and int(resp.headers["Retry-After"]) >= 1
    assert (await resp.json())["title"] == "Service Unavailable"
    assert (await client.get("/healthz")).status == 200  # alive, just not ready

    own_postgres.start()

    async def listing_works() -> Any:
        resp = await client.get("/v1/conversations", headers=alice)
        return resp.status == 200 and await resp.json()

    listing = await wait_until(listing_works, within=20, interval=0.2)
    assert [c["title"] for c in listing["conversations"]] == ["before"]
    resp = await client.post("/v1/chat", json={"message": "after", "stream": False}, headers=alice)
    assert resp.status == 200
    assert (await client.get("/readyz")).status == 200


async def test_boot_waits_for_a_database_that_comes_up_late(
    own_postgres: PostgresServer,
    upstream_settings: Callable[..., Any],
    aiohttp_client: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Boot retries with backoff: a database that appears within the budget is fine."""
    url = own_postgres.create_database(f"late_{uuid.uuid4().hex[:8]}")
    own_postgres.stop()
    settings = upstream_settings(database_url=url, upstream_startup_retry_seconds=30)
    with caplog.at_level(logging.WARNING, logger="pixelcraft.boot"):
        starting = asyncio.ensure_future(aiohttp_client(create_app(settings)))
        await wait_until(lambda: "not reachable yet (attempt 2)" in caplog.text, within=10)
    assert not starting.done()
    await asyncio.get_running_loop().run_in_executor(None, own_postgres.start)
    client = await asyncio.wait_for(starting, 30)
    assert (await client.get("/readyz")).status == 200
