"""The rate limiter through the gateway, on real Redis: buckets, headers, 429s, exactness."""

from __future__ import annotations

import asyncio
import math
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import http_sfv.list
import pytest
from redis.asyncio import Redis

from gateway.limiting.buckets import LocalBuckets, RedisBuckets, Take
from gateway.metrics import metrics_key
from tests.conftest import GatewayStarter, wait_until
from tests.gateway.conftest import FakeUpstream, GatewayFactory

QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"

POLICIES = """
[default]
rate = "{rate}"
burst = {burst}

[ip]
rate = "{ip_rate}"
burst = {ip_burst}

[[rules]]
name = "chat"
methods = ["POST"]
path_prefix = "/v1/chat"
rate = "20/minute"
burst = 2
"""


def policy_file(
    tmp_path: Path,
    rate: str = "1/minute",
    burst: int = 3,
    ip_rate: str = "1/minute",
    ip_burst: int = 1000,
    text: str | None = None,
) -> Path:
    path = tmp_path / f"ratelimits-{uuid.uuid4().hex[:6]}.toml"
    body = POLICIES.format(rate=rate, burst=burst, ip_rate=ip_rate, ip_burst=ip_burst)
    path.write_text(text if text is not None else body)
    return path


def parse_list(value: str) -> dict[str, dict[str, Any]]:
    """A structured-field List (RFC 8941) as {member: params}; fails on any syntax error."""
    parsed = http_sfv.list.List()
    parsed.parse(value.encode())
    return {item.value: dict(item.params) for item in parsed}


def user() -> dict[str, str]:
    return {"X-User-Id": f"user-{uuid.uuid4().hex[:12]}"}


# --- the Lua bucket, straight on Redis -----------------------------------------------------


@pytest.fixture
async def redis(redis_url: str) -> Any:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_bucket_admits_burst_then_denies_with_the_wait_and_refunds(
    redis: Redis, bucket_prefix: str
) -> None:
    errors: list[Exception] = []
    buckets = RedisBuckets(
        redis, timeout=2.0, on_round_trip=lambda *_: None, on_error=errors.append
    )
    await buckets.start()
    key = f"{bucket_prefix}bucket"
    take = Take(key, repr(60e6), "3", 1)  # 1 token a minute, 3 at most
    replies = [(await buckets.take([take]))[0] for _ in range(4)]
    assert [r.allowed for r in replies] == [True, True, True, False]
    assert [r.remaining for r in replies] == [2, 1, 0, 0]
    denied = replies[3]
    assert 59 < denied.retry_after <= 60  # the next token, one interval after the first take
    assert denied.next_token == pytest.approx(denied.retry_after)
    assert 179 < denied.reset <= 180  # three tokens to refill
    ttl = await redis.pttl(key)
    assert 179_000 < ttl <= 180_000  # the key lives exactly as long as the bucket is not full
    refund = (await buckets.take([take._replace(cost=-3)]))[0]
    assert refund.remaining == 3
    assert await redis.exists(key) == 0  # full again: no key at all
    assert errors == []
    await buckets.close()


async def test_a_requests_buckets_are_taken_all_or_nothing(
    redis: Redis, bucket_prefix: str
) -> None:
    buckets = RedisBuckets(
        redis, timeout=2.0, on_round_trip=lambda *_: None, on_error=lambda _: None
    )
    await buckets.start()
    roomy = Take(f"{bucket_prefix}roomy", repr(60e6), "10", 1)
    tight = Take(f"{bucket_prefix}tight", repr(60e6), "1", 1)
    first = await buckets.take([roomy, tight])
    assert [r.allowed for r in first] == [True, True]
    assert [r.remaining for r in first] == [9, 0]
    second = await buckets.take([roomy, tight])
    assert [r.allowed for r in second] == [True, False]  # roomy had the token...
    assert second[0].remaining == 9  # ...and still has it: nothing was taken
    third = await buckets.take([roomy])
    assert third[0].remaining == 8
    await buckets.close()


async def test_one_round_trip_serves_every_request_of_a_loop_turn(
    redis: Redis, bucket_prefix: str
) -> None:
    trips: list[float] = []
    buckets = RedisBuckets(
        redis, timeout=2.0, on_round_trip=lambda s, _: trips.append(s), on_error=lambda _: None
    )
    await buckets.start()
    takes = [Take(f"{bucket_prefix}b{i}", repr(1e6), "5", 1) for i in range(50)]
    results = await asyncio.gather(*(buckets.take([t]) for t in takes))
    assert all(r[0].allowed for r in results)
    assert len(trips) == 1
    await buckets.close()


async def test_noscript_after_a_script_flush_loads_it_again(
    redis_url: str, tmp_path: Path, bucket_prefix: str
) -> None:
    from devtools.services import RedisServer

    with RedisServer(tmp_path / "redis") as server:
        client = Redis.from_url(server.url)
        buckets = RedisBuckets(
            client, timeout=2.0, on_round_trip=lambda *_: None, on_error=lambda _: None
        )
        await buckets.start()
        await client.script_flush()
        reply = await buckets.take([Take("k", repr(1e6), "2", 1)])
        assert reply[0].allowed and reply[0].remaining == 1
        await buckets.close()
        await client.aclose()


def test_local_bucket_runs_at_a_fraction_of_the_policy() -> None:
    now = [100.0]
    local = LocalBuckets(divisor=2, clock=lambda: now[0])
    # policy: 1 token/s, burst 4 -> each of 2 processes: 0.5 token/s, burst 2
    outcomes = [local.take("k", 1.0, 4, 1).allowed for _ in range(3)]
    assert outcomes == [True, True, False]
    now[0] += 1.9
    assert not local.take("k", 1.0, 4, 1).allowed
    now[0] += 0.1
    assert local.take("k", 1.0, 4, 1).allowed
    local.take("k", 1.0, 4, -1)  # refund
    assert local.take("k", 1.0, 4, 1).allowed


def test_local_buckets_stay_bounded() -> None:
    local = LocalBuckets(divisor=1, clock=lambda: 0.0, max_keys=10)
    for i in range(100):
        local.take(f"k{i}", 1.0, 5, 1)
    assert len(local) == 10


# --- through the gateway -------------------------------------------------------------------


async def test_headers_on_every_proxied_response_parse_as_the_draft_says(
    make_gateway: GatewayFactory, upstream: FakeUpstream, tmp_path: Path
) -> None:
    path = policy_file(tmp_path, rate="1/minute", burst=3, ip_rate="10/second", ip_burst=50)
    client = await make_gateway(upstream.url, gateway_ratelimit_config=path)
    who = user()
    for expected_remaining in (2, 1, 0):
        resp = await client.get("/echo", headers=who)
        assert resp.status == 200
        policy = parse_list(resp.headers["RateLimit-Policy"])
        assert policy == {"default": {"q": 3, "w": 180}, "ip": {"q": 50, "w": 5}}
        state = parse_list(resp.headers["RateLimit"])
        assert state["default"]["r"] == expected_remaining
        assert state["ip"]["r"] >= 46
        # t: seconds until at least one token is there, 0 while there is one
        assert state["default"]["t"] == (0 if expected_remaining else 60)
        assert resp.headers["X-RateLimit-Limit"] == "3"  # the tighter policy: default
        assert resp.headers["X-RateLimit-Remaining"] == str(expected_remaining)
        reset = int(resp.headers["X-RateLimit-Reset"])
        assert 60 * (3 - expected_remaining) - 1 <= reset <= 60 * (3 - expected_remaining)
    # a gateway-made error after the limiter ran carries them too
    await upstream.server.close()
    resp = await client.get("/echo", headers=user())
    assert resp.status == 502
    assert "RateLimit" in resp.headers and "RateLimit-Policy" in resp.headers


async def test_denial_is_a_quota_exceeded_problem_and_never_reaches_the_upstream(
    make_gateway: GatewayFactory, upstream: FakeUpstream, tmp_path: Path
) -> None:
    client = await make_gateway(upstream.url, gateway_ratelimit_config=policy_file(tmp_path))
    who = user()
    for _ in range(3):
        assert (await client.get("/echo", headers=who)).status == 200
    seen = len(upstream.state.requests)
    resp = await client.get("/echo", headers=who)
    assert resp.status == 429
    assert resp.content_type == "application/problem+json"
    body = await resp.json()
    assert body["type"] == QUOTA_EXCEEDED
    assert body["status"] == 429
    assert body["title"]
    assert "default" in body["detail"]
    assert body["violated-policies"] == ["default"]
    retry_after = int(resp.headers["Retry-After"])
    assert body["retry_after"] == retry_after
    t = parse_list(resp.headers["RateLimit"])["default"]["t"]
    assert retry_after >= t > 0
    assert 59 <= retry_after <= 60
    assert len(upstream.state.requests) == seen  # the upstream never saw it
    # another user is unaffected
    assert (await client.get("/echo", headers=user())).status == 200


async def test_rules_pick_their_policy_and_cost_zero_exempts(
    make_gateway: GatewayFactory, upstream: FakeUpstream, tmp_path: Path
) -> None:
    text = POLICIES.format(rate="1/minute", burst=3, ip_rate="1/minute", ip_burst=1000) + (
        '\n[[rules]]\nname = "free"\npath_prefix = "/free"\nrate = "1/second"\ncost = 0\n'
    )
    client = await make_gateway(
        upstream.url, gateway_ratelimit_config=policy_file(tmp_path, text=text)
    )
    who = user()
    statuses = [(await client.post("/v1/chat", headers=who, data=b"{}")).status for _ in range(3)]
    assert [s == 429 for s in statuses] == [False, False, True]  # chat: burst 2
    resp = await client.get("/echo", headers=who)
    assert resp.status == 200  # the default bucket is its own
    assert parse_list(resp.headers["RateLimit"])["default"]["r"] == 2
    for _ in range(5):
        resp = await client.get("/free", headers=who)
        assert resp.status != 429
        assert "free" not in parse_list(resp.headers["RateLimit-Policy"])


async def test_inventing_user_ids_from_one_address_meets_the_ceiling(
    make_gateway: GatewayFactory,
    upstream: FakeUpstream,
    tmp_path: Path,
    redis: Redis,
    bucket_prefix: str,
) -> None:
    path = policy_file(tmp_path, rate="1/minute", burst=5, ip_rate="1/minute", ip_burst=4)
    client = await make_gateway(upstream.url, gateway_ratelimit_config=path)
    responses = [await client.get("/echo", headers=user()) for _ in range(10)]
    assert [r.status for r in responses] == [200] * 4 + [429] * 6
    denied = await responses[-1].json()
    assert denied["violated-policies"] == ["ip"]
    assert responses[-1].headers["X-RateLimit-Limit"] == "4"  # names the tighter one
    # the user's own bucket shows its tokens back: the denial cost it nothing
    assert parse_list(responses[-1].headers["RateLimit"])["default"]["r"] == 5
    # the users denied by the ceiling were refunded: only the four admitted ones hold tokens
    await wait_until(lambda: _count_keys(redis, f"{bucket_prefix}rl:default:*", 4), within=5)


async def _count_keys(redis: Redis, pattern: str, expected: int) -> bool:
    keys = [k async for k in redis.scan_iter(match=pattern, count=1000)]
    return len(keys) == expected


async def test_decisions_are_counted_by_policy(
    make_gateway: GatewayFactory, upstream: FakeUpstream, tmp_path: Path
) -> None:
    client = await make_gateway(upstream.url, gateway_ratelimit_config=policy_file(tmp_path))
    who = user()
    for _ in range(5):
        await client.get("/echo", headers=who)
    registry = client.app[metrics_key].registry
    sample = registry.get_sample_value
    assert (
        sample(
            "gateway_ratelimit_decisions_total",
            {"policy": "default", "decision": "allowed", "plan": "default"},
        )
        == 3
    )
    assert (
        sample(
            "gateway_ratelimit_decisions_total",
            {"policy": "default", "decision": "limited", "plan": "default"},
        )
        == 2
    )
    assert (
        sample(
            "gateway_ratelimit_decisions_total",
            {"policy": "ip", "decision": "allowed", "plan": "default"},
        )
        == 5
    )
    assert sample("gateway_ratelimit_fallback_active") == 0
    assert sample("gateway_ratelimit_redis_duration_seconds_count") >= 1
    skew = sample("gateway_ratelimit_redis_clock_skew_seconds")
    assert skew is not None and abs(skew) < 1  # same host: same clock


async def test_rate_limiting_off_adds_nothing(
    make_gateway: GatewayFactory, upstream: FakeUpstream, tmp_path: Path
) -> None:
    client = await make_gateway(
        upstream.url,
        gateway_ratelimit_enabled=False,
        gateway_ratelimit_config=tmp_path / "absent.toml",
    )
    who = user()
    for _ in range(5):
        resp = await client.get("/echo", headers=who)
        assert resp.status == 200
        assert "RateLimit" not in resp.headers


# --- exactness across processes ------------------------------------------------------------


async def test_two_gateways_share_one_users_limit_exactly(
    gateway_process: GatewayStarter,
    upstream: FakeUpstream,
    tmp_path: Path,
) -> None:
    rate_per_second, burst = 2.0, 10
    path = policy_file(tmp_path, rate="2/second", burst=burst, ip_rate="1/second", ip_burst=1000)
    env = {"GATEWAY_RATELIMIT_CONFIG": path, "GATEWAY_RATELIMIT_TIMEOUT_MS": 2000}
    gateways = [await gateway_process(upstream.url, **env) for _ in range(2)]
    who = user()
    async with aiohttp.ClientSession() as session:

        async def one(i: int) -> int:
            async with session.get(f"{gateways[i % 2].url}/echo", headers=who) as resp:
                await resp.read()
                return resp.status

        started = time.monotonic()
        statuses = await asyncio.gather(*(one(i) for i in range(60)))
        elapsed = time.monotonic() - started
        admitted = statuses.count(200)
        assert statuses.count(429) == 60 - admitted
        # exactly the burst, plus whatever refilled while the 60 were being decided
        assert burst <= admitted <= burst + math.floor(rate_per_second * elapsed), (
            admitted,
            elapsed,
        )
        # another user is unaffected
        async with session.get(f"{gateways[0].url}/echo", headers=user()) as resp:
            assert resp.status == 200
        # and the bucket refills: a token comes back within its interval

        async def admitted_again() -> bool:
            async with session.get(f"{gateways[1].url}/echo", headers=who) as resp:
                return resp.status == 200

        await wait_until(admitted_again, within=5, interval=0.1)


# --- policies: boot and SIGHUP -------------------------------------------------------------


async def test_sighup_reloads_policies_and_a_bad_file_keeps_the_old_ones(
    gateway_process: GatewayStarter,
    upstream: FakeUpstream,
    tmp_path: Path,
) -> None:
    path = policy_file(tmp_path, burst=3)
    gateway = await gateway_process(upstream.url, GATEWAY_RATELIMIT_CONFIG=path)

    async def quota() -> int:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{gateway.url}/echo", headers=user()) as resp:
                return int(parse_list(resp.headers["RateLimit-Policy"])["default"]["q"])

    assert await quota() == 3
    path.write_text("[default]\nrate = 'fast'\n")
    gateway.proc.send_signal(signal.SIGHUP)
    await wait_until(lambda: any("not reloaded" in line for line in gateway.output), within=10)
    assert any("default.rate" in line for line in gateway.output)
    assert await quota() == 3
    path.write_text(POLICIES.format(rate="1/minute", burst=7, ip_rate="1/minute", ip_burst=99))
    gateway.proc.send_signal(signal.SIGHUP)

    async def reloaded() -> bool:
        return await quota() == 7

    await wait_until(reloaded, within=10)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{gateway.admin_url}/metrics") as resp:
            text = await resp.text()
    assert 'gateway_ratelimit_policy_reloads_total{result="error"} 1.0' in text
    assert 'gateway_ratelimit_policy_reloads_total{result="ok"} 1.0' in text
