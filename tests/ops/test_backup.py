"""scripts/backup, scripts/restore and scripts/verify-backup against real PostgreSQL, the real
chat service and real redis-servers; the scripts run as subprocesses, exactly as operators
run them."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis

from devtools.services import RedisServer, find_redis_server, free_port
from ops import backup
from tests.conftest import service_env, wait_until, with_database
from upstream.app import create_app
from upstream.migrations import migrate
from upstream.settings import UpstreamSettings

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"

pytestmark = pytest.mark.skipif(
    shutil.which("pg_dump") is None or shutil.which("pg_restore") is None,
    reason="pg_dump / pg_restore not installed (postgresql-client)",
)


@dataclass
class Run:
    status: int
    out: str
    err: str
    pid: int


async def run(script: str, *args: str, cwd: Path, **env: Any) -> Run:
    """Run scripts/<script> from `cwd` (no .env there) with only the given contract variables."""
    proc = await asyncio.create_subprocess_exec(
        SCRIPTS / script,
        *args,
        cwd=cwd,
        env=service_env(**env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode(), proc.pid)


async def admin(url: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


@pytest.fixture
async def source_db(postgres_admin_url: str) -> AsyncIterator[str]:
    """A throwaway database of this test's own; it and any restored copy are dropped after."""
    name = f"pixelcraft_bk_{uuid.uuid4().hex[:10]}"
    await admin(postgres_admin_url, f'CREATE DATABASE "{name}"')
    yield with_database(postgres_admin_url, name)
    for (other,) in await admin(
        postgres_admin_url,
        "SELECT datname FROM pg_database WHERE datname = $1 OR datname LIKE $2",
        name,
        f"{name}\\_%",
    ):
        await admin(postgres_admin_url, f'DROP DATABASE IF EXISTS "{other}" WITH (FORCE)')


def only(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    assert len(found) == 1, found
    return found[0]


# --- the round trip through the API ----------------------------------------------------------


async def test_conversations_survive_backup_drop_and_restore(
    source_db: str, aiohttp_client: Any, tmp_path: Path
) -> None:
    def settings(url: str) -> UpstreamSettings:
        return UpstreamSettings(
            _env_file=None,
            database_url=url,
            upstream_llm_provider="local",
            upstream_local_token_delay=0,
            db_pool_min_size=1,
            db_pool_max_size=4,
        )

    live = await aiohttp_client(create_app(settings(source_db)))
    users = [{"X-User-Id": f"bk-{uuid.uuid4().hex[:8]}"} for _ in range(2)]
    for n, who in enumerate([users[0], users[0], users[1]]):
        resp = await live.post(
            "/v1/chat", json={"message": f"question {n}", "stream": False}, headers=who
        )
        assert resp.status == 200
        if n == 0:  # a follow-up, so a conversation has four messages
            body = await resp.json()
            follow = {"message": "and then?", "conversation_id": body["conversation_id"]}
            resp = await live.post("/v1/chat", json={**follow, "stream": False}, headers=who)
            assert resp.status == 200

    async def snapshot(client: Any) -> dict[str, Any]:
        """Every user's listing and each of their conversations in full, as the API gives them."""
        seen: dict[str, Any] = {}
        for who in users:
            listing = await (await client.get("/v1/conversations", headers=who)).json()
            details = [
                await (await client.get(f"/v1/conversations/{c['id']}", headers=who)).json()
                for c in listing["conversations"]
            ]
            seen[who["X-User-Id"]] = {"listing": listing, "conversations": details}
        return seen

    before = await snapshot(live)
    assert [len(before[who["X-User-Id"]]["conversations"]) for who in users] == [2, 1]

    done = await run("backup", "--verify", cwd=tmp_path, DATABASE_URL=source_db)
    assert done.status == 0, done.err
    assert "backup: verified: 3 tables, 12 rows match" in done.out
    dump = only(tmp_path / "backups", "pixelcraft-*.dump")
    assert re.fullmatch(r"pixelcraft-\d{8}T\d{6}Z\.dump", dump.name)
    assert dump.stat().st_mode & 0o077 == 0  # every conversation is in there
    manifest = json.loads(backup.manifest_path(dump).read_text())
    assert {k: v["rows"] for k, v in manifest["tables"].items()} == {
        "public.conversations": 3,
        "public.messages": 8,
        "public.schema_migrations": 1,
    }
    assert manifest["database"] == source_db.rsplit("/", 1)[1]
    assert manifest["pg_dump_version"].startswith("pg_dump (PostgreSQL)")
    digest = hashlib.sha256(dump.read_bytes()).hexdigest()
    assert backup.sha256_path(dump).read_text() == f"{digest}  {dump.name}\n"

    # Drop the data, through the API.
    for who in users:
        for convo in before[who["X-User-Id"]]["conversations"]:
            resp = await live.delete(f"/v1/conversations/{convo['id']}", headers=who)
            assert resp.status == 204
    gone = await snapshot(live)
    assert all(not gone[who["X-User-Id"]]["conversations"] for who in users)

    target = f"{source_db.rsplit('/', 1)[1]}_restored"
    restored = await run(
        "restore", str(dump), "--target-db", target, cwd=tmp_path, DATABASE_URL=source_db
    )
    assert restored.status == 0, restored.err
    assert f"OK {dump}: 3 tables, 12 rows match in new database '{target}'" in restored.out
    assert f"DATABASE_URL={with_database(source_db, target)}" in restored.out

    copy = await aiohttp_client(create_app(settings(with_database(source_db, target))))
    assert await snapshot(copy) == before
    # The identity sequence came along: new messages get new ids, no collisions.
    more = await copy.post(
        "/v1/chat", json={"message": "after the restore", "stream": False}, headers=users[1]
    )
    assert more.status == 200

    # Over the live database: refused without both flags, then all of it comes back.
    refused = await run("restore", str(dump), "--over-live", cwd=tmp_path, DATABASE_URL=source_db)
    assert refused.status == 2 and "--yes-really" in refused.err
    over = await run(
        "restore",
        str(dump),
        "--over-live",
        "--yes-really",
        "--backup-dir",
        "safety",
        cwd=tmp_path,
        DATABASE_URL=source_db,
    )
    assert over.status == 0, over.err
    assert "OK" in over.out and "in the live database" in over.out
    safety = json.loads(
        backup.manifest_path(only(tmp_path / "safety", "pixelcraft-*.dump")).read_text()
    )
    assert safety["tables"]["public.conversations"]["rows"] == 0  # the state it replaced
    assert await snapshot(live) == before


async def test_restore_refuses_an_existing_database(source_db: str, tmp_path: Path) -> None:
    conn = await asyncpg.connect(source_db)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    assert (await run("backup", cwd=tmp_path, DATABASE_URL=source_db)).status == 0
    dump = only(tmp_path / "backups", "*.dump")
    default = "pixelcraft_restore_" + dump.name.removeprefix("pixelcraft-")[:16].lower()
    try:
        first = await run("restore", str(dump), cwd=tmp_path, DATABASE_URL=source_db)
        assert first.status == 0, first.err
        assert f"new database '{default}'" in first.out
        again = await run("restore", str(dump), cwd=tmp_path, DATABASE_URL=source_db)
        assert again.status == 1
        assert again.err == (
            f"restore: FAILED: database '{default}' already exists on "
            f"{backup.Database(source_db).server}; pick another --target-db or drop it first\n"
        )
    finally:
        await admin(source_db, f'DROP DATABASE IF EXISTS "{default}" WITH (FORCE)')


# --- verification ----------------------------------------------------------------------------


async def test_verify_detects_a_corrupted_dump(
    source_db: str, postgres_admin_url: str, tmp_path: Path
) -> None:
    conn = await asyncpg.connect(source_db)
    try:
        await migrate(conn)
        # Enough rows that the middle of the dump is compressed table data, not the catalog.
        await conn.execute(
            """INSERT INTO conversations (id, user_id, title)
                   SELECT gen_random_uuid(), 'user-' || (i % 50), 'title ' || i
                   FROM generate_series(1, 300) AS i;
               INSERT INTO messages (conversation_id, role, content)
                   SELECT id, 'user', md5(id::text || n) FROM conversations,
                   generate_series(1, 10) AS n"""
        )
    finally:
        await conn.close()
    assert (await run("backup", cwd=tmp_path, DATABASE_URL=source_db)).status == 0
    dump = only(tmp_path / "backups", "*.dump")

    good = await run("verify-backup", str(dump), cwd=tmp_path, DATABASE_URL=source_db)
    assert good.status == 0
    assert good.out.startswith(f"OK {dump}: 3 tables, 3301 rows match")

    data = bytearray(dump.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    dump.write_bytes(data)
    bad = await run("verify-backup", str(dump), cwd=tmp_path, DATABASE_URL=source_db)
    assert bad.status == 1
    assert bad.out.startswith(f"FAILED {dump}: sha256 mismatch")

    # With the checksums made to agree, the restore itself must catch it.
    digest = hashlib.sha256(data).hexdigest()
    backup.sha256_path(dump).write_text(f"{digest}  {dump.name}\n")
    manifest_file = backup.manifest_path(dump)
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**manifest, "sha256": digest}))
    worse = await run("verify-backup", str(dump), cwd=tmp_path, DATABASE_URL=source_db)
    assert worse.status == 1
    assert worse.out.startswith(f"FAILED {dump}: ") and len(worse.out.splitlines()) == 1
    assert "pg_restore failed" in worse.out or "differs" in worse.out or "rows" in worse.out
    leftovers = await admin(
        postgres_admin_url,
        "SELECT datname FROM pg_database WHERE datname LIKE $1",
        f"pixelcraft\\_verify\\_{worse.pid}\\_%",
    )
    assert leftovers == []  # the scratch database is dropped on failure too


async def test_manifest_matches_the_dump_while_the_database_is_written(
    source_db: str, tmp_path: Path
) -> None:
    """Counts come from the dump's own snapshot: rows committed while pg_dump runs are in
    neither, so verification passes however busy the database is."""
    conn, writer_conn = await asyncpg.connect(source_db), await asyncpg.connect(source_db)
    await migrate(conn)
    stop = asyncio.Event()

    async def write() -> None:
        while not stop.is_set():
            await writer_conn.execute(
                """WITH c AS (INSERT INTO conversations (id, user_id, title)
                              VALUES (gen_random_uuid(), 'writer', 'busy') RETURNING id)
                   INSERT INTO messages (conversation_id, role, content)
                   SELECT id, 'user', 'hello' FROM c"""
            )

    writer = asyncio.create_task(write())
    try:
        await wait_until(lambda: conn.fetchval("SELECT count(*) >= 20 FROM conversations"))
        done = await run("backup", "--verify", cwd=tmp_path, DATABASE_URL=source_db)
        at_end = await conn.fetchval("SELECT count(*) FROM conversations")
    finally:
        stop.set()
        await writer
        await conn.close()
        await writer_conn.close()
    assert done.status == 0, done.err
    assert "backup: verified" in done.out
    manifest = json.loads(backup.manifest_path(only(tmp_path / "backups", "*.dump")).read_text())
    dumped = manifest["tables"]["public.conversations"]["rows"]
    assert 20 <= dumped < at_end  # taken mid-stream of writes
    assert manifest["tables"]["public.messages"]["rows"] == dumped


async def test_verify_compares_counts_with_the_manifest(source_db: str, tmp_path: Path) -> None:
    await admin(source_db, "CREATE TABLE notes (body text)")
    await admin(source_db, "INSERT INTO notes VALUES ('a'), ('b')")
    assert (await run("backup", cwd=tmp_path, DATABASE_URL=source_db)).status == 0
    dump = only(tmp_path / "backups", "*.dump")
    manifest_file = backup.manifest_path(dump)
    manifest = json.loads(manifest_file.read_text())
    assert manifest["tables"]["public.notes"]["key_columns"] == ["body"]  # no primary key
    manifest["tables"]["public.notes"]["rows"] = 3
    manifest_file.write_text(json.dumps(manifest))
    told = await run("verify-backup", str(dump), cwd=tmp_path, DATABASE_URL=source_db)
    assert told.status == 1
    assert told.out == f"FAILED {dump}: public.notes has 2 rows, the manifest 3\n"


# --- failures never publish ------------------------------------------------------------------


def fake_old_backups(directory: Path) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for day in (1, 2):
        stem = f"pixelcraft-202401{day:02d}T030000Z"
        for name in (f"{stem}.dump", f"{stem}.dump.sha256", f"{stem}.manifest.json"):
            (directory / name).write_text("old")
            names.append(name)
    return sorted(names)


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != backup.LOCK_NAME)


async def test_a_failed_backup_leaves_nothing_and_deletes_nothing(
    source_db: str, tmp_path: Path
) -> None:
    old = fake_old_backups(tmp_path / "backups")
    # The database cannot be reached: a clear line, without the password.
    url = f"postgresql://postgres:hunter2-secret@127.0.0.1:{free_port()}/nowhere"
    down = await run("backup", "--keep-daily", "1", cwd=tmp_path, DATABASE_URL=url)
    assert down.status == 1 and down.out == ""
    assert down.err.startswith("backup: FAILED: cannot connect to 127.0.0.1:")
    assert len(down.err.splitlines()) == 1 and "hunter2" not in down.err
    assert listing(tmp_path / "backups") == old

    # pg_dump dies after writing part of the dump: nothing under a final name, no temp file.
    fake = tmp_path / "bin" / "pg_dump"
    fake.parent.mkdir()
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = --version ]; then echo "pg_dump (PostgreSQL) 15"; exit 0; fi\n'
        'for a in "$@"; do case "$a" in --file=*) out="${a#--file=}";; esac; done\n'
        'printf "PGDMP half a dump" > "$out"\n'
        'echo "pg_dump: error: connection to server lost" >&2\n'
        "exit 1\n"
    )
    fake.chmod(0o755)
    path = f"{fake.parent}{os.pathsep}{os.environ['PATH']}"
    broken = await run(
        "backup", "--keep-daily", "1", cwd=tmp_path, DATABASE_URL=source_db, PATH=path
    )
    assert broken.status == 1
    assert broken.err == ("backup: FAILED: pg_dump failed (exit 1): connection to server lost\n")
    assert listing(tmp_path / "backups") == old


# --- retention -------------------------------------------------------------------------------


def at(text: str) -> dt.datetime:
    return backup.parse_stamp(text)


def test_retention_keeps_the_newest_of_each_day_and_week() -> None:
    start = dt.datetime(2025, 1, 1, 3, tzinfo=dt.UTC)
    nightly = [start + dt.timedelta(days=n) for n in range(79)]  # to Thu 2025-03-20
    extra = at("20250320T120000Z")  # a second backup on the last day
    kept = backup.select_kept([*nightly, extra], keep_daily=7, keep_weekly=4)
    assert sorted(kept) == [
        at("20250302T030000Z"),  # newest of ISO week 9
        at("20250309T030000Z"),  # newest of ISO week 10
        *(at(f"202503{day}T030000Z") for day in range(14, 20)),  # daily, week 11's newest too
        extra,  # newest of its day (and of week 12); the 03:00 one of that day goes
    ]
    assert backup.select_kept(nightly, keep_daily=2, keep_weekly=0) == set(nightly[-2:])
    assert backup.select_kept([], keep_daily=7, keep_weekly=4) == set()


def test_prune_deletes_only_expired_backups_named_like_ours(tmp_path: Path) -> None:
    def touch(*names: str) -> None:
        for name in names:
            (tmp_path / name).write_text("x")

    def dump_set(stem: str) -> list[str]:
        return [f"{stem}.dump", f"{stem}.dump.sha256", f"{stem}.manifest.json"]

    for day in range(1, 11):  # 2025-02-01 (Sat) .. 2025-02-10 (Mon)
        touch(*dump_set(f"pixelcraft-202502{day:02d}T030000Z"))
        touch(f"pixelcraft-redis-202502{day:02d}T030000Z.rdb")
        touch(f"pixelcraft-redis-202502{day:02d}T030000Z.rdb.sha256")
    strangers = [
        "notes.txt",
        "pixelcraft-latest.dump",
        "other-20250101T030000Z.dump",
        "pixelcraft-20250101T030000Z.dump.bak",
        "pixelcraft-2025-01-01.dump",
    ]
    touch(*strangers)
    touch(".pixelcraft-20250211T030000Z.dump.tmp-4242")  # left by a killed run
    touch("pixelcraft-20250115T030000Z.dump.sha256")  # its dump is gone

    kept, deleted = backup.prune(tmp_path, keep_daily=3, keep_weekly=2)

    # Daily: Feb 10, 9, 8. Weekly: week 7 (Feb 10) and week 6 (newest Feb 9).
    # Week 5 (Feb 1-2) is beyond the 2 weeks.
    expected = [*strangers]
    for survivor in ("08", "09", "10"):
        expected += dump_set(f"pixelcraft-202502{survivor}T030000Z")
        expected += [
            f"pixelcraft-redis-202502{survivor}T030000Z.rdb",
            f"pixelcraft-redis-202502{survivor}T030000Z.rdb.sha256",
        ]
    assert listing(tmp_path) == sorted(expected)
    assert len(kept) == 6 and len(deleted) == 14
    assert all(path.name.endswith((".dump", ".rdb")) for path in deleted)


async def test_backup_applies_retention_after_a_good_backup(source_db: str, tmp_path: Path) -> None:
    old = fake_old_backups(tmp_path / "backups")
    done = await run(
        "backup", "--keep-daily", "2", "--keep-weekly", "0", cwd=tmp_path, DATABASE_URL=source_db
    )
    assert done.status == 0, done.err
    assert "deleted pixelcraft-20240101T030000Z.dump" in done.out
    names = listing(tmp_path / "backups")
    assert [n for n in old if n in names] == [n for n in old if "20240102" in n]
    assert len(names) == 6


# --- Redis -----------------------------------------------------------------------------------


@pytest.mark.skipif(
    find_redis_server() is None or shutil.which("redis-cli") is None, reason="no Redis"
)
async def test_redis_snapshot_restores_into_a_fresh_server(source_db: str, tmp_path: Path) -> None:
    # Diskless replication (Redis 7's default) waits repl-diskless-sync-delay (5 s) for more
    # replicas before it streams the snapshot to redis-cli --rdb; nothing to wait for here.
    with RedisServer(tmp_path / "source", extra_args=["--repl-diskless-sync-delay", "0"]) as source:
        client = redis.Redis.from_url(source.url)
        try:
            client.set("pctest:plain", "value")
            client.hset("pctest:hash", mapping={"a": "1", "b": "2"})
            client.set("pctest:expiring", "soon", ex=3600)
        finally:
            client.close()
        done = await run(
            "backup", "--redis", cwd=tmp_path, DATABASE_URL=source_db, REDIS_URL=source.url
        )
        assert done.status == 0, done.err
        rdb = only(tmp_path / "backups", "pixelcraft-redis-*.rdb")
        assert rdb.read_bytes().startswith(b"REDIS")
        digest = hashlib.sha256(rdb.read_bytes()).hexdigest()
        assert backup.sha256_path(rdb).read_text() == f"{digest}  {rdb.name}\n"

        # A running instance is never written under.
        busy = await run(
            "restore", "--redis-rdb", str(rdb), "--redis-dir", str(source.workdir), cwd=tmp_path
        )
        assert busy.status == 1 and "is running in" in busy.err

    fresh_dir = tmp_path / "fresh"
    placed = await run(
        "restore", "--redis-rdb", str(rdb), "--redis-dir", str(fresh_dir), cwd=tmp_path
    )
    assert placed.status == 0, placed.err
    assert (fresh_dir / "dump.rdb").read_bytes() == rdb.read_bytes()
    assert f"redis-server --dir {fresh_dir}" in placed.out
    with RedisServer(fresh_dir) as fresh:
        client = redis.Redis.from_url(fresh.url)
        try:
            assert client.get("pctest:plain") == b"value"
            assert client.hgetall("pctest:hash") == {b"a": b"1", b"b": b"2"}
            assert 0 < client.ttl("pctest:expiring") <= 3600
        finally:
            client.close()


# --- the command line ------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["backup", "restore", "verify-backup"])
async def test_help(script: str, tmp_path: Path) -> None:
    shown = await run(script, "--help", cwd=tmp_path)
    assert shown.status == 0 and shown.out.startswith(f"usage: scripts/{script}")
    if script == "backup":
        assert "OPTIONAL" in shown.out and "rate-limit" in shown.out


async def test_verify_needs_a_database_url(tmp_path: Path) -> None:
    dump = tmp_path / "pixelcraft-20250101T000000Z.dump"
    dump.write_bytes(b"PGDMP")
    told = await run("verify-backup", str(dump), cwd=tmp_path)
    assert told.status == 1
    assert told.out == (
        f"FAILED {dump}: VERIFY_DATABASE_URL or DATABASE_URL is not set "
        "(in the environment or .env)\n"
    )
