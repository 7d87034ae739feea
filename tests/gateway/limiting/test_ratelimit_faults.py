"""The limiter when Redis fails, and on every Redis deployment: each test owns its Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from redis.crc import key_slot

from devtools.services import RedisCluster, RedisSentinel, RedisServer
from gateway.app import create_app
from gateway.limiting.breaker import SLOW_TRIPS
from gateway.limiting.limiter import identity_digest
from gateway.metrics import metrics_key
from pixelcraft.boot import DependencyUnavailable
from tests.conftest import wait_until
from tests.gateway.conftest import FakeUpstream, GatewayFactory
from tests.gateway.limiting.test_ratelimit import parse_list, policy_file, user

DEADLINE_MS = 50
# A request must never wait on a failing Redis much past the deadline; without one it would
# wait out the client's 1 s socket timeout (or forever, on a paused server).
BOUND = 0.75

FAULT_POLICIES = """
[default]
rate = "1/minute"
burst = 3
failure_mode = "local"

[[rules]]
name = "chat"
methods = ["POST"]
path_prefix = "/v1/chat"
rate = "1/minute"
burst = 100
failure_mode = "closed"

[[rules]]
name = "public"
path_prefix = "/public"
rate = "1/minute"
burst = 1
failure_mode = "open"
"""


async def command(client: Redis, *words: str) -> Any:
    """A raw Redis command (redis-py leaves execute_command unannotated)."""
    return await client.execute_command(*words)  # type: ignore[no-untyped-call]


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
async def faulty_gateway(
    make_gateway: GatewayFactory, upstream: FakeUpstream, own_redis: RedisServer, tmp_path: Path
) -> TestClient[Any, Any]:
    path = policy_file(tmp_path, text=FAULT_POLICIES)
    return await make_gateway(
        upstream.url,
        redis_url=own_redis.url,
        gateway_ratelimit_config=path,
        gateway_ratelimit_timeout_ms=DEADLINE_MS,
    )


def gauge(client: TestClient[Any, Any], name: str, labels: dict[str, str] | None = None) -> float:
    value = client.app[metrics_key].registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def degraded(client: TestClient[Any, Any]) -> bool:
    return gauge(client, "gateway_ratelimit_fallback_active") == 1


class Load:
    """Requests in a loop until stopped, each one timed."""

    def __init__(self, client: TestClient[Any, Any]) -> None:
        self.client = client
        self.slowest = 0.0
        self.statuses: list[int] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        who = user()
        while not self._stop.is_set():
            started = time.monotonic()
            resp = await self.client.get("/public", headers=who)
            await resp.read()
            self.slowest = max(self.slowest, time.monotonic() - started)
            self.statuses.append(resp.status)
            await asyncio.sleep(0.005)

    def __enter__(self) -> Load:
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


async def timed_get(client: TestClient[Any, Any], path: str, **kwargs: Any) -> tuple[Any, float]:
    started = time.monotonic()
    method = client.post if path.startswith("/v1/chat") else client.get
    resp = await method(path, **kwargs)
    await resp.read()
    return resp, time.monotonic() - started


async def assert_failure_modes(client: TestClient[Any, Any]) -> None:
    """While degraded: local buckets for `default`, 503 for `chat`, allow for `public`."""
    who = user()
    results = [await timed_get(client, "/echo", headers=who) for _ in range(4)]
    assert [r.status for r, _ in results] == [200, 200, 200, 429]  # local: burst 3 / 1 process
    assert "RateLimit" in results[0][0].headers
    chat, chat_took = await timed_get(client, "/v1/chat", headers=who, data=b"{}")
    assert chat.status == 503
    body = await chat.json()
    assert "failure_mode closed" in body["detail"]
    assert int(chat.headers["Retry-After"]) >= 1
    public = [await timed_get(client, "/public", headers=who) for _ in range(3)]
    assert all(r.status not in (429, 503) for r, _ in public)  # open: burst 1 does not count
    # an unknown count is listed as a policy, with no state
    assert "public" in parse_list(public[0][0].headers["RateLimit-Policy"])
    assert "RateLimit" not in public[0][0].headers
    slowest = max(t for _, t in [*results, (chat, chat_took), *public])
    assert slowest < BOUND, slowest


async def test_redis_killed_mid_load_then_back_on_its_port(
    faulty_gateway: TestClient[Any, Any], own_redis: RedisServer
) -> None:
    client = faulty_gateway
    assert (await client.get("/echo", headers=user())).status == 200
    assert not degraded(client)
    load = Load(client)
    with load:
        await wait_until(lambda: len(load.statuses) >= 3, within=5)
        own_redis.kill()
        await wait_until(lambda: degraded(client), within=5)
        await assert_failure_modes(client)
        own_redis.start()  # same port
        await wait_until(lambda: not degraded(client), within=10)
    await load.stop()
    assert load.slowest < BOUND, load.slowest
    assert 503 not in load.statuses  # the open policy never turned anyone away
    assert gauge(client, "gateway_ratelimit_backend_errors_total") >= 1
    fallback = {"policy": "default", "decision": "fallback_allowed", "plan": "default"}
    assert gauge(client, "gateway_ratelimit_decisions_total", fallback) == 3
    closed = {"policy": "chat", "decision": "closed_rejected", "plan": "default"}
    assert gauge(client, "gateway_ratelimit_decisions_total", closed) == 1
    # shared limits again: a fresh user gets the real burst from Redis
    who = user()
    statuses = [(await client.get("/echo", headers=who)).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    allowed = {"policy": "default", "decision": "allowed", "plan": "default"}
    assert gauge(client, "gateway_ratelimit_decisions_total", allowed) >= 4


async def test_redis_stalled_by_client_pause_is_bounded_by_the_deadline(
    faulty_gateway: TestClient[Any, Any], own_redis: RedisServer
) -> None:
    client = faulty_gateway
    assert (await client.get("/echo", headers=user())).status == 200
    admin = Redis.from_url(own_redis.url)
    try:
        await command(admin, "CLIENT", "PAUSE", "3000", "ALL")
        # A missed deadline decides that batch without Redis, on the local buckets whatever
        # the failure mode (one miss may be this process being late, not Redis): even the
        # chat rule, which fails closed, admits it. A few misses in a row open the breaker.
        resp, took = await timed_get(client, "/v1/chat", headers=user(), data=b"{}")
        assert resp.status != 503
        assert took < BOUND, took
        assert not degraded(client)
        for _ in range(SLOW_TRIPS - 1):
            resp, took = await timed_get(client, "/echo", headers=user())
            assert resp.status == 200
            assert took < BOUND, took
        assert degraded(client)
        await assert_failure_modes(client)
        await wait_until(lambda: not degraded(client), within=10)
    finally:
        await command(admin, "CLIENT", "UNPAUSE")
        await admin.aclose()


async def test_redis_refusing_the_script_degrades_then_recovers(
    faulty_gateway: TestClient[Any, Any], own_redis: RedisServer
) -> None:
    client = faulty_gateway
    admin = Redis.from_url(own_redis.url)
    try:
        await command(admin, "ACL", "SETUSER", "default", "-evalsha")
        resp, _ = await timed_get(client, "/v1/chat", headers=user(), data=b"{}")
        assert resp.status == 503  # that request found out: chat fails closed
        assert degraded(client)
        await command(admin, "ACL", "SETUSER", "default", "+evalsha")
        await wait_until(lambda: not degraded(client), within=10)
        resp, _ = await timed_get(client, "/v1/chat", headers=user(), data=b"{}")
        assert resp.status != 503
    finally:
        await command(admin, "ACL", "SETUSER", "default", "+@all")
        await admin.aclose()


async def test_a_redis_that_refuses_scripts_at_boot_is_unavailable(
    upstream: FakeUpstream, own_redis: RedisServer, gateway_settings: Any
) -> None:
    admin = Redis.from_url(own_redis.url)
    await command(admin, "ACL", "SETUSER", "default", "-script")
    await admin.aclose()
    app = create_app(gateway_settings(upstream.url, redis_url=own_redis.url))
    runner = web.AppRunner(app)
    with pytest.raises(DependencyUnavailable, match="refuses the rate-limit script"):
        await runner.setup()
    await app.cleanup()


# --- Redis deployments ---------------------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    with RedisCluster(tmp_path / "cluster") as running:
        yield running


def user_on_slots(prefix: str, low: int, high: int) -> dict[str, str]:
    """A user whose `default` bucket key hashes to a slot in [low, high]: the cluster's slots
    are split evenly in ranges, so users drawn from far-apart ranges sit on different nodes."""
    while True:
        who = user()
        key = f"{prefix}rl:default:{identity_digest('header', who['X-User-Id'])}"
        if low <= key_slot(key.encode()) <= high:
            return who


async def test_limits_are_exact_on_a_redis_cluster(
    make_gateway: GatewayFactory,
    upstream: FakeUpstream,
    cluster: RedisCluster,
    tmp_path: Path,
    bucket_prefix: str,
) -> None:
    path = policy_file(tmp_path, rate="1/minute", burst=3, ip_rate="1/minute", ip_burst=7)
    client = await make_gateway(
        upstream.url,
        redis_url=cluster.url,
        gateway_redis_cluster=True,
        gateway_ratelimit_config=path,
        gateway_ratelimit_timeout_ms=1000,
    )
    # several users whose buckets land on different nodes (the first and last third of the
    # slots), so a request's keys are on two nodes at least
    users = [
        user_on_slots(bucket_prefix, 0, 5000),
        user_on_slots(bucket_prefix, 11500, 16383),
        user(),
    ]
    statuses = [(await client.get("/echo", headers=who)).status for who in users for _ in range(4)]
    assert statuses[:4] == [200, 200, 200, 429]
    assert statuses.count(200) == 7  # the ceiling: 7 per address across them all
    assert not degraded(client)
    nodes_with_keys = 0
    for port in cluster.ports:
        node = Redis(host="127.0.0.1", port=port)
        nodes_with_keys += (await node.dbsize()) > 0
        await node.aclose()
    assert nodes_with_keys >= 2


@pytest.fixture
def sentinel(own_redis: RedisServer, tmp_path: Path) -> Iterator[RedisSentinel]:
    with RedisSentinel(tmp_path / "sentinel", own_redis) as running:
        yield running


async def test_limits_through_a_sentinel_managed_primary(
    make_gateway: GatewayFactory,
    upstream: FakeUpstream,
    own_redis: RedisServer,
    sentinel: RedisSentinel,
    tmp_path: Path,
) -> None:
    client = await make_gateway(
        upstream.url,
        redis_url="redis://ignored-by-sentinel-mode/0",
        gateway_redis_sentinels=sentinel.address,
        gateway_redis_sentinel_service=sentinel.service,
        gateway_ratelimit_config=policy_file(tmp_path, burst=2),
        gateway_ratelimit_timeout_ms=1000,
    )
    who = user()
    statuses = [(await client.get("/echo", headers=who)).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    primary = Redis.from_url(own_redis.url)
    assert await primary.dbsize() >= 1  # the buckets live on the primary sentinel named
    await primary.aclose()
