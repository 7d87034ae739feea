"""Backups for scripts/backup, scripts/restore and scripts/verify-backup (see BACKUP_RESTORE.md).

A PostgreSQL backup is three files: `pixelcraft-<UTC stamp>.dump` (`pg_dump -Fc`), its `.sha256`
(`sha256sum -c` format) and `pixelcraft-<stamp>.manifest.json`: per-table row counts and
checksums taken in the snapshot the dump was taken in (exported from a REPEATABLE READ
transaction kept open while `pg_dump --snapshot` runs), so they match the dump exactly however
busy the database is. Every file is written under a temporary name, fsynced and renamed, the
dump last: a file with a final name is always complete. Passwords reach pg_dump, pg_restore and
redis-cli through the environment, never the command line (which `ps` shows to every user).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg
from pydantic import ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pixelcraft.boot import MASK, error_lines, mask_url
from pixelcraft.fields import check_url

STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
DUMP_NAME = re.compile(r"^pixelcraft-(\d{8}T\d{6}Z)\.dump$")
RDB_NAME = re.compile(r"^pixelcraft-redis-(\d{8}T\d{6}Z)\.rdb$")
SIDECAR_NAME = re.compile(
    r"^pixelcraft-(\d{8}T\d{6}Z)(\.dump\.sha256|\.manifest\.json)$"
    r"|^pixelcraft-redis-(\d{8}T\d{6}Z)\.rdb\.sha256$"
)
TEMP_NAME = re.compile(r"^\.pixelcraft-.+\.tmp-\d+$")
LOCK_NAME = ".pixelcraft-backup.lock"
MANIFEST_FORMAT = "pixelcraft-backup/1"
CONNECT_TIMEOUT = 10.0

# Text output of these types depends on session settings; pinned so that a checksum taken on
# the source and one taken on a restored copy (maybe another server) hash the same text.
CHECKSUM_SETTINGS = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    "lc_monetary": "C",
    "lock_timeout": "60s",
}


class BackupError(Exception):
    """A backup, restore or verification step failed; the message is one line for the user."""


class BackupSettings(BaseSettings):
    """The variables the backup scripts read, from the environment and `.env` like the services."""

    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", case_sensitive=False, env_ignore_empty=True
    )

    database_url: str | None = None
    redis_url: str | None = None
    # Server for verify-backup's scratch databases; default DATABASE_URL's.
    verify_database_url: str | None = None

    @field_validator("database_url", "verify_database_url")
    @classmethod
    def _postgres(cls, value: str | None) -> str | None:
        return None if value is None else check_url(value, ("postgres", "postgresql"))

    @field_validator("redis_url")
    @classmethod
    def _redis(cls, value: str | None) -> str | None:
        return None if value is None else check_url(value, ("redis", "rediss", "unix"))


def load_settings() -> BackupSettings:
    try:
        return BackupSettings()
    except ValidationError as exc:
        raise BackupError("; ".join(error_lines(exc))) from None


def required(value: str | None, name: str) -> str:
    if not value:
        raise BackupError(f"{name} is not set (in the environment or .env)")
    return value


# --- database URLs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Database:
    """A PostgreSQL database named by URL; only `masked`, `server` and `where` are shown."""

    url: str

    @property
    def name(self) -> str:
        parts = urlsplit(self.url)
        # libpq's default database is the user name.
        return unquote(parts.path.lstrip("/")) or unquote(parts.username or "postgres")

    @property
    def server(self) -> str:
        """`host:port`."""
        parts = urlsplit(self.url)
        return f"{parts.hostname or 'localhost'}:{parts.port or 5432}"

    @property
    def where(self) -> str:
        """`host:port/name`, without user or password."""
        return f"{self.server}/{self.name}"

    @property
    def masked(self) -> str:
        return mask_url(self.url)

    @property
    def password(self) -> str | None:
        password = urlsplit(self.url).password
        return None if password is None else unquote(password)

    def with_name(self, name: str) -> Database:
        parts = urlsplit(self.url)
        return Database(urlunsplit(parts._replace(path=f"/{name}")))

    def check_session_level(self) -> None:
        """Refuse Supabase's transaction pooler: pg_dump and snapshots need a session."""
        parts = urlsplit(self.url)
        if parts.port == 6543 and (parts.hostname or "").endswith(".pooler.supabase.com"):
            raise BackupError(
                "DATABASE_URL is Supabase's transaction pooler (port 6543): use the session "
                "pooler (port 5432) or the direct connection for backups and restores"
            )

    def libpq(self) -> tuple[str, dict[str, str]]:
        """A conninfo URL without the password, and the environment carrying it."""
        parts = urlsplit(self.url)
        netloc = parts.netloc.rpartition("@")[2]
        if parts.username is not None:
            netloc = f"{parts.username}@{netloc}"
        env = dict(os.environ, PGAPPNAME="pixelcraft-backup", PGCONNECT_TIMEOUT="10")
        if self.password is not None:
            env["PGPASSWORD"] = self.password
        return urlunsplit(parts._replace(netloc=netloc)), env

    def scrub(self, text: str) -> str:
        """`text` with the password masked, should a library ever echo it."""
        password = self.password
        return text.replace(password, MASK) if password and len(password) >= 4 else text

    async def connect(self) -> asyncpg.Connection:
        try:
            conn = await asyncpg.connect(self.url, timeout=CONNECT_TIMEOUT)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            message = f"cannot connect to {self.where}: {_one_line(exc)}"
            raise BackupError(self.scrub(message)) from None
        try:
            for name, value in CHECKSUM_SETTINGS.items():
                await conn.execute(f"SET {name} = '{value}'")
        except BaseException:
            await conn.close()
            raise
        return conn


def _one_line(exc: BaseException | str) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# --- files -----------------------------------------------------------------------------------


def stamp(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime(STAMP_FORMAT)


def parse_stamp(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, STAMP_FORMAT).replace(tzinfo=dt.UTC)


def temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def sha256_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.sha256")


def manifest_path(dump: Path) -> Path:
    return dump.with_name(f"{dump.name.removesuffix('.dump')}.manifest.json")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make renames in `path` durable (POSIX: the directory entry is the directory's data)."""
    fsync_file(path)


def publish(temp: Path, final: Path) -> None:
    """fsync `temp`, rename it to `final` atomically, and make the rename durable."""
    fsync_file(temp)
    os.replace(temp, final)
    fsync_dir(final.parent)


def write_atomically(final: Path, text: str) -> None:
    temp = temp_path(final)
    try:
        temp.write_text(text)
        publish(temp, final)
    finally:
        temp.unlink(missing_ok=True)


def check_sha256(path: Path) -> str:
    """The file's sha256 when it matches the `.sha256` beside it; BackupError otherwise."""
    sidecar = sha256_path(path)
    try:
        expected = sidecar.read_text().split()[0].lower()
    except (OSError, IndexError):
        raise BackupError(f"no checksum file {sidecar.name} beside it") from None
    actual = sha256_file(path)
    if actual != expected:
        raise BackupError(
            f"sha256 mismatch: {sidecar.name} says {expected[:12]}…, the file is "
            f"{actual[:12]}… (corrupted or truncated)"
        )
    return actual


@contextlib.contextmanager
def directory_lock(directory: Path) -> Iterator[None]:
    """One backup at a time per directory (a timer run and a manual one may meet)."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / LOCK_NAME).open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackupError(f"another backup is running in {directory}") from None
        yield


# --- table statistics ------------------------------------------------------------------------


@dataclass(frozen=True)
class TableStats:
    """Row count and order-independent checksums of one table's key columns and whole rows."""

    rows: int
    key_columns: list[str]
    key_checksum: str
    row_checksum: str


# Tables pg_dump dumps the data of: ordinary and partitioned tables, not temporary ones, not
# extension members (whose data pg_dump leaves to CREATE EXTENSION), in the chosen schemas.
_TABLES_SQL = """
SELECT c.oid, n.nspname, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
  AND (cardinality($1::text[]) = 0 OR n.nspname = ANY($1::text[]))
ORDER BY n.nspname, c.relname
"""

_KEY_COLUMNS_SQL = """
SELECT a.attname
FROM pg_index i
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = $1 AND i.indisprimary
ORDER BY k.ord
"""

_ALL_COLUMNS_SQL = """
SELECT attname FROM pg_attribute
WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum
"""


def _hash_sum(expression: str) -> str:
    """Sum of the first 64 bits of each row's md5: order-independent, constant memory."""
    return f"coalesce(sum(('x' || left(md5({expression}), 16))::bit(64)::bigint), 0)"


async def table_stats(
    conn: asyncpg.Connection, schemas: Sequence[str] = ()
) -> dict[str, TableStats]:
    """Per table (`schema.table`): rows, and checksums of the primary key and of whole rows.

    Key columns are the primary key's, or every column when there is none. Run inside the
    transaction whose snapshot the dump uses, on a connection from `Database.connect()`.
    """
    stats = {}
    for oid, schema, table in await conn.fetch(_TABLES_SQL, list(schemas)):
        keys = [r[0] for r in await conn.fetch(_KEY_COLUMNS_SQL, oid)]
        keys = keys or [r[0] for r in await conn.fetch(_ALL_COLUMNS_SQL, oid)]
        key_hash = _hash_sum("ROW(" + ", ".join(f"t.{quote_ident(k)}" for k in keys) + ")::text")
        row_hash = _hash_sum("ROW(t.*)::text")
        source = f"{quote_ident(schema)}.{quote_ident(table)}"
        query = f"SELECT count(*), {key_hash}::text, {row_hash}::text FROM {source} AS t"  # noqa: S608
        row = await conn.fetchrow(query)
        assert row is not None  # an aggregate without GROUP BY returns one row
        stats[f"{schema}.{table}"] = TableStats(row[0], keys, row[1], row[2])
    return stats


def compare(
    expected: dict[str, TableStats], actual: dict[str, TableStats], *, extra_ok: bool = False
) -> list[str]:
    """What differs between the manifest's tables and a restored database's, one item each."""
    problems = []
    for name, want in expected.items():
        got = actual.get(name)
        if got is None:
            problems.append(f"{name} missing")
        elif got.rows != want.rows:
            problems.append(f"{name} has {got.rows} rows, the manifest {want.rows}")
        elif got.key_columns != want.key_columns:
            problems.append(f"{name} key columns {got.key_columns} != {want.key_columns}")
        elif got.key_checksum != want.key_checksum:
            problems.append(f"{name} key checksum differs")
        elif got.row_checksum != want.row_checksum:
            problems.append(f"{name} row checksum differs")
    if not extra_ok:
        problems += [f"{name} not in the manifest" for name in actual if name not in expected]
    return problems


# --- manifest --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    file: str
    created_at: str
    database: str
    server: str
    server_version: str
    pg_dump_version: str
    schemas: list[str]
    snapshot: str
    sha256: str
    size_bytes: int
    tables: dict[str, TableStats]

    @property
    def total_rows(self) -> int:
        return sum(t.rows for t in self.tables.values())

    def to_json(self) -> str:
        body = {"format": MANIFEST_FORMAT, **asdict(self), "total_rows": self.total_rows}
        return json.dumps(body, indent=2) + "\n"

    @classmethod
    def read(cls, dump: Path) -> Manifest:
        path = manifest_path(dump)
        try:
            body = json.loads(path.read_text())
            if body.pop("format") != MANIFEST_FORMAT:
                raise ValueError("unknown format")
            body.pop("total_rows", None)
            body["tables"] = {k: TableStats(**v) for k, v in body["tables"].items()}
            return cls(**body)
        except FileNotFoundError:
            raise BackupError(f"no manifest {path.name} beside it") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BackupError(f"unreadable manifest {path.name}: {_one_line(exc)}") from None


# --- external tools --------------------------------------------------------------------------


def tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise BackupError(f"{name} not found on PATH: install {package}")
    return found


async def run_tool(args: Sequence[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run a command; its exit status and stderr (stdout discarded)."""
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        _, err = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, err.decode(errors="replace")


def last_error(stderr: str) -> str:
    """The most telling part of a tool's stderr, on one line: its first error with the detail
    lines after it, else its last line; without the `pg_dump: error: ` kind of prefix."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    first = next((i for i, line in enumerate(lines) if re.search(r"error|fatal", line, re.I)), None)
    if first is None:
        return lines[-1] if lines else "no message"
    picked = [lines[first]]
    picked += [line for line in lines[first + 1 :] if re.match(r"^[\w-]+: detail: ", line)]
    return "; ".join(re.sub(r"^[\w-]+: (?:error|detail): ", "", line) for line in picked)


async def tool_version(binary: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        binary, "--version", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await proc.communicate()
    return out.decode(errors="replace").strip()


# --- PostgreSQL backup -----------------------------------------------------------------------


@dataclass(frozen=True)
class BackupResult:
    path: Path
    manifest: Manifest
    seconds: float


async def backup_postgres(
    db: Database,
    directory: Path,
    *,
    now: dt.datetime,
    schemas: Sequence[str] = (),
    compress: int | None = None,
) -> BackupResult:
    """pg_dump -Fc in an exported snapshot, with its checksum and manifest; call under the lock."""
    started = time.monotonic()
    pg_dump = tool("pg_dump", "postgresql-client")
    final = directory / f"pixelcraft-{stamp(now)}.dump"
    if final.exists():
        raise BackupError(f"{final} already exists")
    temp = temp_path(final)
    sidecars = [sha256_path(final), manifest_path(final)]
    published = False
    db.check_session_level()
    conninfo, env = db.libpq()
    conn = await db.connect()
    try:
        # The snapshot is exported by the first statement, and lives while this transaction does.
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            snapshot = await conn.fetchval("SELECT pg_export_snapshot()")
            server_version = await conn.fetchval("SHOW server_version")
            args = [
                pg_dump,
                "--format=custom",
                "--no-password",
                f"--snapshot={snapshot}",
                "--lock-wait-timeout=60s",
                f"--file={temp}",
                f"--dbname={conninfo}",
                *(f"--schema={s}" for s in schemas),
                *([f"--compress={compress}"] if compress is not None else []),
            ]
            dump = asyncio.create_task(run_tool(args, env))
            try:
                tables = await table_stats(conn, schemas)
            except BaseException:
                dump.cancel()  # run_tool kills pg_dump
                with contextlib.suppress(asyncio.CancelledError):
                    await dump
                raise
            status, stderr = await dump
        if status != 0:
            raise BackupError(db.scrub(f"pg_dump failed (exit {status}): {last_error(stderr)}"))
        if not temp.is_file() or temp.stat().st_size == 0:
            raise BackupError("pg_dump exited 0 but wrote nothing")
        fsync_file(temp)
        manifest = Manifest(
            file=final.name,
            created_at=now.astimezone(dt.UTC).isoformat().replace("+00:00", "Z"),
            database=db.name,
            server=db.server,
            server_version=server_version,
            pg_dump_version=await tool_version(pg_dump),
            schemas=list(schemas),
            snapshot=snapshot,
            sha256=sha256_file(temp),
            size_bytes=temp.stat().st_size,
            tables=tables,
        )
        # Sidecars first, the dump last: a dump under its final name is always complete.
        write_atomically(sidecars[0], f"{manifest.sha256}  {final.name}\n")
        write_atomically(sidecars[1], manifest.to_json())
        publish(temp, final)
        published = True
    except asyncpg.PostgresError as exc:
        raise BackupError(db.scrub(f"reading {db.where}: {_one_line(exc)}")) from exc
    finally:
        temp.unlink(missing_ok=True)
        if not published:
            for path in sidecars:
                path.unlink(missing_ok=True)
        await conn.close()
    return BackupResult(final, manifest, time.monotonic() - started)


# --- retention -------------------------------------------------------------------------------


def select_kept(
    stamps: Sequence[dt.datetime], keep_daily: int, keep_weekly: int
) -> set[dt.datetime]:
    """The newest backup of each of the `keep_daily` newest days that have one, and of each of
    the `keep_weekly` newest ISO weeks that have one (the current week included)."""
    kept: set[dt.datetime] = set()
    days: set[dt.date] = set()
    weeks: set[tuple[int, int]] = set()
    for when in sorted(set(stamps), reverse=True):
        day, week = when.date(), when.isocalendar()[:2]
        if day not in days and len(days) < keep_daily:
            days.add(day)
            kept.add(when)
        if week not in weeks and len(weeks) < keep_weekly:
            weeks.add(week)
            kept.add(when)
    return kept


def prune(directory: Path, keep_daily: int, keep_weekly: int) -> tuple[list[Path], list[Path]]:
    """Apply retention in `directory` (under its lock): (kept, deleted) backup files.

    Only files named like ours are touched: dumps and Redis snapshots (each family on its own),
    their sidecars, sidecars whose backup is gone, and temporary files of interrupted runs.
    """
    names = [entry.name for entry in directory.iterdir() if entry.is_file()]
    kept: list[Path] = []
    deleted: list[Path] = []
    for pattern, sidecars in (
        (DUMP_NAME, (sha256_path, manifest_path)),
        (RDB_NAME, (sha256_path,)),
    ):
        found = {parse_stamp(m[1]): directory / m[0] for n in names if (m := pattern.match(n))}
        keep = select_kept(list(found), keep_daily, keep_weekly)
        for when, path in sorted(found.items(), reverse=True):
            if when in keep:
                kept.append(path)
                continue
            path.unlink()
            deleted.append(path)
            for sidecar in sidecars:
                sidecar(path).unlink(missing_ok=True)
    for name in names:
        match = SIDECAR_NAME.match(name)
        if match:
            main = f"pixelcraft-{match[1]}.dump" if match[1] else f"pixelcraft-redis-{match[3]}.rdb"
            if not (directory / main).exists():
                (directory / name).unlink(missing_ok=True)
        elif TEMP_NAME.match(name):
            (directory / name).unlink(missing_ok=True)
    fsync_dir(directory)
    return kept, deleted


# --- restore and verification ----------------------------------------------------------------


async def database_exists(server: Database, name: str) -> bool:
    conn = await server.connect()
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()


async def create_database(server: Database, name: str) -> None:
    """CREATE DATABASE from template0: nothing in it that a restore could collide with."""
    conn = await server.connect()
    try:
        await conn.execute(f"CREATE DATABASE {quote_ident(name)} TEMPLATE template0")
    except asyncpg.DuplicateDatabaseError:
        raise BackupError(f"database {name!r} already exists on {server.server}") from None
    except asyncpg.PostgresError as exc:
        raise BackupError(f"cannot create database {name!r}: {_one_line(exc)}") from exc
    finally:
        await conn.close()


async def drop_database(server: Database, name: str) -> None:
    conn = await server.connect()
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
    finally:
        await conn.close()


async def pg_restore(target: Database, dump: Path, *, over: bool = False, jobs: int = 1) -> None:
    """Restore `dump` into `target` without owners or grants (roles differ between servers).

    `over`: replace the objects the dump holds in one transaction, all or nothing.
    """
    binary = tool("pg_restore", "postgresql-client")
    target.check_session_level()
    conninfo, env = target.libpq()
    args = [
        binary,
        "--exit-on-error",
        "--no-owner",
        "--no-acl",
        "--no-password",
        f"--dbname={conninfo}",
    ]
    if over:
        args += ["--clean", "--if-exists", "--single-transaction"]
    elif jobs > 1:
        args.append(f"--jobs={jobs}")
    status, stderr = await run_tool([*args, str(dump)], env)
    if status != 0:
        raise BackupError(target.scrub(f"pg_restore failed: {last_error(stderr)}"))


async def check_restored(
    target: Database, manifest: Manifest, *, extra_ok: bool = False
) -> list[str]:
    conn = await target.connect()
    try:
        actual = await table_stats(conn, manifest.schemas)
    finally:
        await conn.close()
    return compare(manifest.tables, actual, extra_ok=extra_ok)


def summary(manifest: Manifest) -> str:
    return f"{len(manifest.tables)} tables, {manifest.total_rows} rows match"


async def verify_dump(dump: Path, server: Database) -> tuple[Manifest, float]:
    """Checksum, restore into a scratch database (always dropped), compare with the manifest."""
    started = time.monotonic()
    manifest = Manifest.read(dump)
    actual = check_sha256(dump)
    if actual != manifest.sha256:
        raise BackupError("sha256 differs from the manifest's")
    scratch = f"pixelcraft_verify_{os.getpid()}_{secrets.token_hex(3)}"
    await create_database(server, scratch)
    try:
        target = server.with_name(scratch)
        await pg_restore(target, dump)
        problems = await check_restored(target, manifest)
    finally:
        await drop_database(server, scratch)
    if problems:
        raise BackupError("; ".join(problems))
    return manifest, time.monotonic() - started


# --- Redis -----------------------------------------------------------------------------------


def redis_cli_args(url: str) -> tuple[list[str], dict[str, str]]:
    """redis-cli connection flags for a redis://, rediss:// or unix:// URL; the password goes
    in REDISCLI_AUTH."""
    parts = urlsplit(url)
    env = dict(os.environ)
    if parts.scheme == "unix":
        args = ["-s", unquote(parts.path)]
    else:
        args = ["-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379)]
        if parts.scheme == "rediss":
            args.append("--tls")
    if parts.username:
        args += ["--user", unquote(parts.username)]
    if parts.password is not None:
        env["REDISCLI_AUTH"] = unquote(parts.password)
    return args, env


def check_rdb(path: Path) -> None:
    with path.open("rb") as f:
        if f.read(5) != b"REDIS":
            raise BackupError(f"{path.name} is not an RDB file")


async def backup_redis(url: str, directory: Path, *, now: dt.datetime) -> Path:
    """A point-in-time RDB via `redis-cli --rdb` (a replica's full sync), published atomically."""
    redis_cli = tool("redis-cli", "redis-tools")
    final = directory / f"pixelcraft-redis-{stamp(now)}.rdb"
    temp = temp_path(final)
    args, env = redis_cli_args(url)
    published = False
    try:
        status, stderr = await run_tool([redis_cli, *args, "--rdb", str(temp)], env)
        if status != 0 or not temp.is_file():
            raise BackupError(f"redis-cli --rdb failed (exit {status}): {last_error(stderr)}")
        check_rdb(temp)
        fsync_file(temp)
        write_atomically(sha256_path(final), f"{sha256_file(temp)}  {final.name}\n")
        publish(temp, final)
        published = True
    finally:
        temp.unlink(missing_ok=True)
        if not published:
            sha256_path(final).unlink(missing_ok=True)
    return final


def redis_servers_in(directory: Path) -> tuple[list[int], list[int]]:
    """Pids of redis-server processes working in `directory` (Redis chdirs to its `dir`), and
    of those whose directory this user may not read (another user's, when not root)."""
    target = directory.resolve()
    running, unknown = [], []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "redis-server":
                continue
        except OSError:
            continue  # gone meanwhile
        try:
            if Path(os.readlink(entry / "cwd")) == target:
                running.append(int(entry.name))
        except PermissionError:
            unknown.append(int(entry.name))
        except OSError:
            pass
    return running, unknown


def place_rdb(
    rdb: Path, redis_dir: Path, *, now: dt.datetime
) -> tuple[Path, Path | None, list[int]]:
    """Install `rdb` as `redis_dir`/dump.rdb for a stopped instance: (installed, previous
    dump.rdb moved aside, pids of redis-servers that may not be checked)."""
    if not rdb.is_file():
        raise BackupError(f"{rdb} does not exist")
    check_rdb(rdb)
    if sha256_path(rdb).exists():
        check_sha256(rdb)
    redis_dir.mkdir(parents=True, exist_ok=True)
    running, unknown = redis_servers_in(redis_dir)
    if running:
        raise BackupError(
            f"redis-server (pid {', '.join(map(str, running))}) is running in {redis_dir}: "
            "stop it first"
        )
    final = redis_dir / "dump.rdb"
    previous = None
    if final.exists():
        previous = redis_dir / f"dump.rdb.before-restore-{stamp(now)}"
        os.replace(final, previous)
    temp = temp_path(final)
    try:
        shutil.copyfile(rdb, temp)
        owner = redis_dir.stat()
        if os.geteuid() == 0:  # the redis user must be able to read (and later replace) it
            os.chown(temp, owner.st_uid, owner.st_gid)
        publish(temp, final)
    finally:
        temp.unlink(missing_ok=True)
    return final, previous, unknown


def aof_present(redis_dir: Path) -> bool:
    return (redis_dir / "appendonlydir").exists() or (redis_dir / "appendonly.aof").exists()


def describe_size(size: int) -> str:
    if size < 1000:
        return f"{size} B"
    value = float(size)
    for unit in ("kB", "MB", "GB"):
        value /= 1000
        if value < 1000:
            return f"{value:.1f} {unit}"
    return f"{value / 1000:.1f} TB"


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)
