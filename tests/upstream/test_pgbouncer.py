"""Behind PgBouncer in transaction mode (Supabase's pooler) with DB_STATEMENT_CACHE_SIZE=0."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import asyncpg
import pytest

from devtools.services import PgBouncer
from tests.conftest import with_database
from tests.support.sse import collect
from tests.upstream.conftest import UpstreamFactory
from upstream.migrations import available

pytestmark = pytest.mark.skipif(shutil.which("pgbouncer") is None, reason="no pgbouncer binary")


@pytest.fixture
def bouncer(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgBouncer]:
    parts = urlsplit(database_url)
    # Two server connections shared by many clients: a statement prepared on one is soon run on
    # the other. With asyncpg's default statement cache this test fails with 500s (prepared
    # statement "__asyncpg_stmt_…__" does not exist); with DB_STATEMENT_CACHE_SIZE=0 it passes.
    server = PgBouncer(
        tmp_path_factory.mktemp("pgbouncer"),
        parts.hostname or "127.0.0.1",
        parts.port or 5432,
        user=parts.username or "postgres",
        pool_size=2,
    )
    with server:
        yield server


async def test_chat_through_transaction_pooling(
    bouncer: PgBouncer, database_url: str, make_upstream: UpstreamFactory
) -> None:
    url = bouncer.url_for(urlsplit(database_url).path.lstrip("/"))
    client = await make_upstream(database_url=url, db_statement_cache_size=0, db_pool_max_size=8)

    async def conversation(n: int) -> None:
        who = {"X-User-Id": f"bouncer-{uuid.uuid4().hex[:8]}"}
        resp = await client.post("/v1/chat", json={"message": f"hello {n}"}, headers=who)
        assert resp.status == 200
        done = (await collect(resp))[-1]
        assert done[0] == "done", done
        convo_id = done[1]["conversation_id"]
        follow = await client.post(
            "/v1/chat",
            json={"message": "and again", "conversation_id": convo_id, "stream": False},
            headers=who,
        )
        assert follow.status == 200
        got = await (await client.get(f"/v1/conversations/{convo_id}", headers=who)).json()
        assert [m["role"] for m in got["messages"]] == ["user", "assistant"] * 2
        listing = await (await client.get("/v1/conversations", headers=who)).json()
        assert [c["id"] for c in listing["conversations"]] == [convo_id]

    await asyncio.gather(*(conversation(n) for n in range(16)))


async def test_migrations_run_through_the_pooler(
    bouncer: PgBouncer, postgres_admin_url: str, make_upstream: UpstreamFactory
) -> None:
    """The advisory lock is transaction-scoped, so two replicas booting through it migrate once."""
    name = f"pixelcraft_bouncer_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(postgres_admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = bouncer.url_for(name)
        clients = await asyncio.gather(
            *(make_upstream(database_url=url, db_statement_cache_size=0) for _ in range(2))
        )
        for client in clients:
            assert (await client.get("/readyz")).status == 200
            await client.close()
        direct = await asyncpg.connect(with_database(postgres_admin_url, name))
        try:
            rows = await direct.fetch("SELECT version FROM schema_migrations ORDER BY version")
        finally:
            await direct.close()
        assert [r["version"] for r in rows] == [m.version for m in available()]
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
