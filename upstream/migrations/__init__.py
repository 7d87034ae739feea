"""Versioned SQL migrations, applied at boot.

Files are `NNNN_name.sql` beside this module. All pending ones run in one transaction that first
takes a transaction-scoped advisory lock, so replicas booting together apply each migration exactly
once (the second waits, then finds nothing to do), and a failure applies none of them. A
transaction-scoped lock also works through PgBouncer in transaction mode, where a session lock
would not. Each applied version is recorded in `schema_migrations` with the file's checksum; an
applied file that changed later is reported, never re-run.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

logger = logging.getLogger(__name__)

# pg_advisory_xact_lock key: any constant unique to this schema ("PXCM").
LOCK_KEY = 0x5058434D
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    """One SQL file: its version (the file name without `.sql`), text and checksum."""

    version: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available() -> list[Migration]:
    """The shipped migrations in version order."""
    found = []
    for entry in resources.files(__package__).iterdir():
        if entry.name.endswith(".sql"):
            if not _NAME.match(entry.name):
                raise ValueError(f"migration file {entry.name!r} is not named NNNN_name.sql")
            found.append(Migration(entry.name.removesuffix(".sql"), entry.read_text("utf-8")))
    return sorted(found, key=lambda m: m.version)


async def migrate(conn: asyncpg.Connection, migrations: list[Migration] | None = None) -> list[str]:
    """Apply what is pending; return the versions applied by this call."""
    todo = available() if migrations is None else migrations
    applied: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version     text PRIMARY KEY,
                   checksum    text NOT NULL,
                   applied_at  timestamptz NOT NULL DEFAULT now()
               )"""
        )
        done = {
            row["version"]: row["checksum"]
            for row in await conn.fetch("SELECT version, checksum FROM schema_migrations")
        }
        for migration in todo:
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    logger.warning(
                        "migration %s changed since it was applied; it is not re-run",
                        migration.version,
                    )
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)",
                migration.version,
                migration.checksum,
            )
            applied.append(migration.version)
    for version in applied:
        logger.info("applied migration %s", version)
    return applied
