"""Shared fixtures: real PostgreSQL and Redis, one database and one key prefix per test run.

Services come from DATABASE_URL / REDIS_URL when set, else this machine's local servers
(PostgreSQL 127.0.0.1:5432, Redis 127.0.0.1:6379), else embedded ones started for the run.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis

from devtools import services as devservices

if TYPE_CHECKING:
    from tests.support.processes import Launcher, Service

LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
LOCAL_REDIS = "redis://127.0.0.1:6379/0"
RUN_ID = uuid.uuid4().hex[:10]

# Every variable either service reads: tests that exercise validation start from none of them.
CONTRACT_PREFIXES = ("GATEWAY_", "UPSTREAM_", "OPENAI_", "DB_")
CONTRACT_NAMES = ("REDIS_URL", "DATABASE_URL")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under CI=true a skipped test is a failure: CI must have everything the suite needs."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which counts as a failure: {report.longrepr}"


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def services_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def postgres_admin_url(services_dir: Path) -> Iterator[str]:
    """A PostgreSQL URL with the right to create databases."""
    given = os.environ.get("DATABASE_URL")
    if given:
        yield given
    elif devservices.tcp_reachable("127.0.0.1", 5432):
        yield LOCAL_POSTGRES
    else:
        with devservices.PostgresServer(services_dir / "postgres") as server:
            yield server.url


@pytest.fixture(scope="session")
def database_url(postgres_admin_url: str) -> Iterator[str]:
    """A database of this run's own, dropped at the end."""
    yield from scratch_database(postgres_admin_url, f"pixelcraft_test_{RUN_ID}")


def scratch_database(postgres_admin_url: str, name: str) -> Iterator[str]:
    """Create database `name`, yield its URL, drop it (whoever is still connected)."""

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(postgres_admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    yield with_database(postgres_admin_url, name)
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def redis_url(services_dir: Path) -> Iterator[str]:
    given = os.environ.get("REDIS_URL")
    if given:
        yield given
    elif devservices.tcp_reachable("127.0.0.1", 6379):
        yield LOCAL_REDIS
    else:
        with devservices.RedisServer(services_dir / "redis") as server:
            yield server.url


@pytest.fixture(scope="session")
def key_prefix(redis_url: str) -> Iterator[str]:
    """This run's Redis key prefix; its keys are deleted at the end."""
    prefix = f"pctest:{RUN_ID}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def bucket_prefix(key_prefix: str) -> str:
    """A Redis key prefix of this test's own: buckets (the per-address ceiling above all,
    every test comes from 127.0.0.1) never carry over from one test to the next."""
    return f"{key_prefix}{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No contract variable in the environment and no .env in the working directory."""
    for name in list(os.environ):
        if name.startswith(CONTRACT_PREFIXES) or name in CONTRACT_NAMES:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def service_env(**variables: Any) -> dict[str, str]:
    """os.environ without contract variables, plus `variables`, for a service subprocess."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith(CONTRACT_PREFIXES) or k in CONTRACT_NAMES)
    }
    env.update({k: str(v) for k, v in variables.items()})
    return env


async def wait_until(
    predicate: Callable[[], Any], within: float = 10.0, interval: float = 0.05
) -> Any:
    """Poll an (async or plain) predicate until it returns something truthy, or fail."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(interval)


def sync_wait(predicate: Callable[[], Any], within: float, what: str) -> Any:
    """wait_until for synchronous fixtures: poll with a deadline."""
    deadline = time.monotonic() + within
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within} s")
        time.sleep(0.05)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the run's database, for assertions."""
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@pytest.fixture
async def fake_openai(aiohttp_server: Any) -> Any:
    """The fake OpenAI API on a real socket; script it through `.state`."""
    from tests.fakes.openai_server import FakeOpenAI, FakeOpenAIServer, create_fake_openai

    state = FakeOpenAI()
    server = await aiohttp_server(create_fake_openai(state))
    return FakeOpenAIServer(base_url=str(server.make_url("/v1")), state=state)


@pytest.fixture
async def launcher(tmp_path: Path) -> AsyncIterator[Launcher]:
    """Service processes for this test (tests/support/processes.py), killed at its end."""
    from tests.support.processes import Launcher

    workdir = tmp_path / "processes"
    workdir.mkdir()
    async with Launcher(workdir) as launcher:
        yield launcher


GatewayStarter = Callable[..., Awaitable["Service"]]


@pytest.fixture
def gateway_process(launcher: Launcher, redis_url: str, bucket_prefix: str) -> GatewayStarter:
    """`await gateway_process(upstream_url, **GATEWAY_env)`: `python -m gateway` on this run's
    Redis and this test's key prefix (Launcher.gateway has the options)."""

    async def start(upstream_url: str, **options: Any) -> Service:
        return await launcher.gateway(
            redis_url=redis_url, upstream_url=upstream_url, key_prefix=bucket_prefix, **options
        )

    return start
