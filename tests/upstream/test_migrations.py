"""Migrations: applied once under concurrency, atomically, recorded with checksums."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.conftest import with_database
from upstream.migrations import Migration, available, migrate


@pytest.fixture
async def fresh_db(postgres_admin_url: str) -> AsyncIterator[str]:
    """An empty database for one test."""
    name = f"pixelcraft_mig_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(postgres_admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(postgres_admin_url, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def test_shipped_migrations_are_ordered_and_named() -> None:
    versions = [m.version for m in available()]
    assert versions == sorted(versions) and versions[0] == "0001_init"


async def test_two_replicas_booting_at_once_apply_each_migration_once(fresh_db: str) -> None:
    conns = [await asyncpg.connect(fresh_db) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        versions = [m.version for m in available()]
        assert sorted(v for applied in results for v in applied) == versions  # exactly once
        rows = await conns[0].fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == versions
        assert await migrate(conns[0]) == []
        tables = await conns[0].fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
        )
        assert [t["tablename"] for t in tables] == [
            "conversations",
            "messages",
            "schema_migrations",
        ]
    finally:
        for conn in conns:
            await conn.close()


async def test_a_failing_migration_applies_nothing(fresh_db: str) -> None:
    conn = await asyncpg.connect(fresh_db)
    try:
        broken = [*available(), Migration("9999_broken", "CREATE TABLE oops (; ")]
        with pytest.raises(asyncpg.PostgresSyntaxError):
            await migrate(conn, broken)
        assert await conn.fetchval("SELECT to_regclass('conversations')") is None
        assert await conn.fetchval("SELECT to_regclass('schema_migrations')") is None
    finally:
        await conn.close()


async def test_an_edited_applied_migration_is_reported_not_rerun(
    fresh_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    conn = await asyncpg.connect(fresh_db)
    try:
        await migrate(conn)
        edited = [Migration(m.version, m.sql + "\n-- edited\n") for m in available()]
        with caplog.at_level(logging.WARNING, logger="upstream.migrations"):
            assert await migrate(conn, edited) == []
        assert "0001_init changed since it was applied" in caplog.text
    finally:
        await conn.close()
