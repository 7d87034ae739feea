"""Limits that follow the customer: plans from the token (or a trusted proxy's X-User-Plan),
per-user overrides in Redis that every gateway applies, and the operator's CLI and admin API.

Real Redis; the cross-gateway tests run two gateway processes on one Redis and one key prefix."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

import aiohttp
import jwt
import pytest
from redis.asyncio import Redis

from gateway.limiting.admin import allowed
from gateway.limiting.operator import LimitsOperator, OperatorError, parse_until
from gateway.limiting.policies import PolicyError, parse_policies
from gateway.settings import GatewaySettings
from tests.conftest import GatewayStarter, wait_until
from tests.gateway.conftest import FakeUpstream, GatewayFactory

ROOT = Path(__file__).resolve().parents[3]
SECRET = "plans-test-secret-that-is-at-least-32-bytes"

POLICIES = """
[default]
rate = "1/minute"
burst = 2

[plans.pro.default]
burst = 5

[plans.team.default]
rate = "1/minute"
burst = 4
"""


def write_policies(tmp_path: Path, text: str = POLICIES) -> Path:
    path = tmp_path / f"ratelimits-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(text)
    return path


def token(sub: str, **claims: Any) -> dict[str, str]:
    body = {"sub": sub, "exp": 4_000_000_000, **claims}
    return {"Authorization": f"Bearer {jwt.encode(body, SECRET, algorithm='HS256')}"}


def members(header: str) -> dict[str, str]:
    """RateLimit-Policy / RateLimit as {name: its parameters}."""
    out = {}
    for member in header.split(", "):
        name, _, params = member.partition(";")
        out[name.strip('"')] = params
    return out


def remaining(headers: Any, policy: str) -> int:
    params = members(headers["RateLimit"])[policy]
    return int(dict(p.split("=") for p in params.split(";"))["r"])


async def get(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> Any:
    async with session.get(f"{url}/echo", headers=headers) as resp:
        body = await resp.read()
        return resp.status, resp.headers, body


def limits_cli(redis_url: str, prefix: str, policies: Path, *args: str) -> tuple[int, str, str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
        "REDIS_URL": redis_url,
        "GATEWAY_REDIS_KEY_PREFIX": prefix,
        "GATEWAY_RATELIMIT_CONFIG": str(policies),
    }
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "limits", *args],
        env=env,
        cwd=policies.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr


async def holds(admin_url: str, count: float) -> bool:
    """Whether a gateway process holds `count` overrides (its gateway_ratelimit_overrides)."""
    async with aiohttp.ClientSession() as session, session.get(f"{admin_url}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith("gateway_ratelimit_overrides "):
                return float(line.split()[1]) == count
    raise AssertionError("gateway_ratelimit_overrides is not exported")


# --- the policy file --------------------------------------------------------------------------


def test_plans_change_only_what_they_name_and_key_their_own_buckets() -> None:
    policies = parse_policies(POLICIES + '\n[plans.big.default]\ntokens = "1000/day"\n', "t")
    default = policies.default
    pro = policies.plans["pro"]["default"]
    assert (pro.burst, pro.rate_text) == (5, default.rate_text)  # rate inherited
    assert pro.bucket == "default@pro" and default.bucket == "default"
    assert pro.member == '"default";q=5;w=300;pixelcraft-plan="pro"'
    assert default.member == '"default";q=2;w=120'
    big = policies.plans["big"]["default"].tokens
    assert big is not None and big.bucket == "default-tokens@big" and big.burst == 1000


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ('[plans.pro.ip]\nrate = "1/second"', "plans.pro.ip"),
        ('[plans.pro.chat]\nrate = "1/second"', "plans.pro.chat"),
        ("[plans.default.default]\nburst = 3", "plans.default"),
        ("[plans.Pro.default]\nburst = 3", "plans.Pro"),
        ('[plans.x.default]\nrate = "fast"', "plans.x.default.rate"),
        ("[plans.x.default]\ncolour = 1", "plans.x.default.colour"),
        ("[plans.x]\nburst = 3", "plans.x.burst"),
        ("[plans.x.default]\ntokens_burst = 3", "plans.x.default.tokens"),
    ],
)
def test_bad_plans_name_the_key(extra: str, where: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policies(POLICIES + "\n" + extra + "\n", "t")
    assert any(p.startswith(f"{where}:") for p in caught.value.problems), caught.value.problems


async def test_a_bad_plan_file_stops_the_gateway_with_78_naming_the_key(
    upstream: FakeUpstream, gateway_process: GatewayStarter, tmp_path: Path
) -> None:
    bad = write_policies(tmp_path, POLICIES + '\n[plans.gold.default]\nrate = "lots"\n')
    gateway = await gateway_process(upstream.url, GATEWAY_RATELIMIT_CONFIG=bad, wait=False)
    assert await asyncio.wait_for(gateway.proc.wait(), 30) == 78
    await gateway.reader
    assert "plans.gold.default.rate" in gateway.log()


# --- plans on the wire ------------------------------------------------------------------------


async def test_a_pro_token_gets_the_pro_rate_and_a_free_one_the_default_on_two_gateways(
    upstream: FakeUpstream, gateway_process: GatewayStarter, tmp_path: Path
) -> None:
    policies = write_policies(tmp_path)
    env = {"GATEWAY_RATELIMIT_CONFIG": policies, "GATEWAY_JWT_SECRET": SECRET}
    one = await gateway_process(upstream.url, **env)
    two = await gateway_process(upstream.url, **env)
    pro, free = token("alice", plan="pro"), token("bob")
    async with aiohttp.ClientSession() as session:
        pro_statuses = [(await get(session, (one, two)[i % 2].url, pro))[0] for i in range(7)]
        free_statuses = [(await get(session, (one, two)[i % 2].url, free))[0] for i in range(4)]
        status, headers, body = await get(session, one.url, pro)
    assert pro_statuses == [200] * 5 + [429] * 2
    assert free_statuses == [200] * 2 + [429] * 2
    assert status == 429
    assert members(headers["RateLimit-Policy"])["default"] == 'q=5;w=300;pixelcraft-plan="pro"'
    assert json.loads(body)["plan"] == "pro"
    async with aiohttp.ClientSession() as session, session.get(f"{one.admin_url}/metrics") as r:
        text = await r.text()
    assert 'gateway_ratelimit_decisions_total{decision="allowed",plan="pro",policy="default"}' in (
        text
    )
    # the access log says whose plan applied (written in batches)
    await wait_until(lambda: "id=jwt plan=pro" in one.log(), within=5)


async def test_an_upgrade_mid_burst_is_honoured_on_the_next_request(
    upstream: FakeUpstream, make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    client = await make_gateway(
        upstream.url, gateway_ratelimit_config=write_policies(tmp_path), gateway_jwt_secret=SECRET
    )
    statuses = [(await client.get("/echo", headers=token("carol"))).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    upgraded = await client.get("/echo", headers=token("carol", plan="pro"))
    assert upgraded.status == 200  # the pro plan's own bucket: full
    assert remaining(upgraded.headers, "default") == 4
    back = await client.get("/echo", headers=token("carol"))
    assert back.status == 429  # and the default plan's bucket is still spent


async def test_a_nested_claim_and_an_unknown_plan(
    upstream: FakeUpstream, make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    client = await make_gateway(
        upstream.url,
        gateway_ratelimit_config=write_policies(tmp_path),
        gateway_jwt_secret=SECRET,
        gateway_plan_claim="app_metadata.plan",
    )
    nested = await client.get("/echo", headers=token("dan", app_metadata={"plan": "team"}))
    assert 'pixelcraft-plan="team"' in nested.headers["RateLimit-Policy"]
    flat = await client.get("/echo", headers=token("erin", plan="pro"))  # not at that path
    assert "pixelcraft-plan" not in flat.headers["RateLimit-Policy"]
    unknown = await client.get("/echo", headers=token("fay", app_metadata={"plan": "gold"}))
    assert unknown.status == 200
    assert "pixelcraft-plan" not in unknown.headers["RateLimit-Policy"]  # the default's


async def test_x_user_plan_is_believed_as_x_user_id_is(
    upstream: FakeUpstream, make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    policies = write_policies(tmp_path)
    believed = await make_gateway(upstream.url, gateway_ratelimit_config=policies)  # "any"
    resp = await believed.get("/echo", headers={"X-User-Id": "gus", "X-User-Plan": "pro"})
    assert 'pixelcraft-plan="pro"' in resp.headers["RateLimit-Policy"]
    pairs = cast(list[tuple[str, str]], upstream.state.requests[-1]["headers"])
    forwarded = {name.lower(): value for name, value in pairs}
    assert "x-user-plan" not in forwarded and forwarded["x-user-id"] == "gus"
    bad = await believed.get("/echo", headers={"X-User-Id": "gus", "X-User-Plan": "Pro Max"})
    assert bad.status == 400
    assert (await bad.json())["header"] == "X-User-Plan"
    anonymous = await believed.get("/echo", headers={"X-User-Plan": "pro"})
    assert "pixelcraft-plan" not in anonymous.headers["RateLimit-Policy"]  # no user, no plan
    untrusted = await make_gateway(
        upstream.url, gateway_ratelimit_config=policies, gateway_user_id_header="trusted"
    )
    resp = await untrusted.get("/echo", headers={"X-User-Id": "gus", "X-User-Plan": "pro"})
    assert "pixelcraft-plan" not in resp.headers["RateLimit-Policy"]


async def test_the_openapi_document_lists_each_plans_limits(
    upstream: FakeUpstream, make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    client = await make_gateway(upstream.url, gateway_ratelimit_config=write_policies(tmp_path))

    async def annotated() -> Any:
        doc = await (await client.get("/openapi.json")).json()
        return doc["paths"].get("/echo", {}).get("get", {}).get("x-ratelimit-plans")

    plans = await wait_until(annotated, within=10)
    assert [(p["policy"], p["burst"]) for p in plans["pro"]] == [("default", 5)]
    assert [(p["policy"], p["burst"], p["rate"]) for p in plans["team"]] == [
        ("default", 4, "1/minute")
    ]


# --- overrides ------------------------------------------------------------------------------


async def test_cli_set_changes_decisions_on_both_gateways_and_unset_restores_them(
    upstream: FakeUpstream,
    gateway_process: GatewayStarter,
    tmp_path: Path,
    redis_url: str,
    bucket_prefix: str,
) -> None:
    policies = write_policies(tmp_path)
    env = {
        "GATEWAY_RATELIMIT_CONFIG": policies,
        "GATEWAY_RATELIMIT_OVERRIDES_REFRESH_SECONDS": "0.2",
    }
    gateways = [await gateway_process(upstream.url, **env) for _ in range(2)]
    who = {"X-User-Id": "hal"}
    code, _, err = limits_cli(
        redis_url, bucket_prefix, policies,
        "set", "hal", "default", "--burst", "6", "--reason", "ticket 1: launch",
    )  # fmt: skip
    assert code == 0, err
    for gateway in gateways:  # each picks it up within its refresh interval
        await wait_until(partial(holds, gateway.admin_url, 1.0), within=5)
    async with aiohttp.ClientSession() as session:
        statuses = [(await get(session, gateways[i % 2].url, who))[0] for i in range(7)]
        _, headers, body = await get(session, gateways[0].url, who)
    assert statuses == [200] * 6 + [429]
    assert members(headers["RateLimit-Policy"])["default"] == "q=6;w=360;pixelcraft-override"
    assert json.loads(body)["override"] is True
    code, _, err = limits_cli(
        redis_url, bucket_prefix, policies, "unset", "hal", "default", "--reason", "over"
    )
    assert code == 0, err
    for gateway in gateways:
        await wait_until(partial(holds, gateway.admin_url, 0.0), within=5)
    async with aiohttp.ClientSession() as session:
        for gateway in gateways:
            status, headers, _ = await get(session, gateway.url, who)
            assert status == 429  # back to burst 2, on the same (spent) bucket
            assert members(headers["RateLimit-Policy"])["default"] == "q=2;w=120"
    code, _, err = limits_cli(
        redis_url, bucket_prefix, policies, "unset", "hal", "default", "--reason", "again"
    )
    assert code == 1 and "no override" in err


@pytest.fixture
async def redis(redis_url: str) -> Any:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_an_expired_override_lapses_by_itself(
    upstream: FakeUpstream,
    make_gateway: GatewayFactory,
    tmp_path: Path,
    redis: Redis,
    bucket_prefix: str,
) -> None:
    path = write_policies(tmp_path)
    client = await make_gateway(
        upstream.url,
        gateway_ratelimit_config=path,
        gateway_ratelimit_overrides_refresh_seconds=0.1,
    )
    ops = LimitsOperator(redis, parse_policies(path.read_text(), "t"), bucket_prefix)
    await ops.set("ivy", "default", {"burst": 9}, until=parse_until("1.5s"), reason="r", by="t")

    async def policy() -> str:
        resp = await client.get("/echo", headers={"X-User-Id": "ivy"})
        return members(resp.headers["RateLimit-Policy"])["default"]

    assert await wait_until(lambda: _is(policy(), "q=9;w=540;pixelcraft-override"), within=5)
    assert await wait_until(lambda: _is(policy(), "q=2;w=120"), within=10)  # nobody unset it
    listed = await ops.list_overrides()
    assert [(o["user"], o["live"]) for o in listed] == [("ivy", False)]


async def _is(value: Any, expected: str) -> bool:
    return bool(await value == expected)


async def test_reset_refills_and_show_matches_the_headers(
    upstream: FakeUpstream,
    make_gateway: GatewayFactory,
    tmp_path: Path,
    redis: Redis,
    bucket_prefix: str,
) -> None:
    path = write_policies(tmp_path)
    client = await make_gateway(upstream.url, gateway_ratelimit_config=path)
    ops = LimitsOperator(redis, parse_policies(path.read_text(), "t"), bucket_prefix)
    who = {"X-User-Id": "jo", "X-User-Plan": "pro"}
    for _ in range(2):
        last = await client.get("/echo", headers=who)
    shown = await ops.show("jo")
    assert shown["plans_seen"] == ["pro"]
    [bucket] = shown["buckets"]
    assert (bucket["policy"], bucket["plan"], bucket["identity"]) == ("default", "pro", "header")
    assert bucket["remaining"] == remaining(last.headers, "default") == 3
    assert bucket["burst"] == 5
    for _ in range(3):
        await client.get("/echo", headers=who)
    assert (await client.get("/echo", headers=who)).status == 429
    assert await ops.reset("jo", "default", reason="stuck", by="t") == 1
    after = await client.get("/echo", headers=who)
    assert after.status == 200 and remaining(after.headers, "default") == 4
    assert (await ops.show("nobody"))["buckets"] == []


async def test_operator_mistakes_name_the_option(redis: Redis, bucket_prefix: str) -> None:
    ops = LimitsOperator(redis, parse_policies(POLICIES, "t"), bucket_prefix)
    cases: list[tuple[Callable[[], Any], str]] = [
        (lambda: ops.set("kim", "chat", {"burst": 3}, until=None, reason="r", by="t"), "policy"),
        (lambda: ops.set("kim", "default", {}, until=None, reason="r", by="t"), "set"),
        (lambda: ops.set("kim", "default", {"rate": "x"}, until=None, reason="r", by="t"), "rate"),
        (lambda: ops.set("kim", "default", {"burst": 3}, until=None, reason=" ", by="t"), "reason"),
        (lambda: ops.set("k m", "default", {"burst": 3}, until=None, reason="r", by="t"), "user"),
    ]
    for call, word in cases:
        with pytest.raises(OperatorError, match=word):
            await call()
    with pytest.raises(OperatorError, match="until"):
        parse_until("yesterday")
    with pytest.raises(OperatorError, match="future"):
        parse_until("2001-01-01T00:00:00")


async def test_the_audit_stream_records_every_change(
    tmp_path: Path, redis_url: str, bucket_prefix: str
) -> None:
    policies = write_policies(tmp_path)
    run = [
        ("set", "lee", "default", "--rate", "2/minute", "--until", "1h", "--reason", "trial",
         "--by", "ops-anna"),
        ("reset", "lee", "--reason", "refill", "--by", "ops-anna"),
        ("unset", "lee", "default", "--reason", "trial over", "--by", "ops-ben"),
    ]  # fmt: skip
    for args in run:
        code, _, err = limits_cli(redis_url, bucket_prefix, policies, *args)
        assert code == 0, err
    code, out, err = limits_cli(redis_url, bucket_prefix, policies, "--json", "audit")
    assert code == 0, err
    entries = json.loads(out)
    assert [(e["action"], e["user"], e["policy"], e["by"], e["reason"]) for e in entries] == [
        ("set", "lee", "default", "ops-anna", "trial"),
        ("reset", "lee", "*", "ops-anna", "refill"),
        ("unset", "lee", "default", "ops-ben", "trial over"),
    ]
    assert entries[0]["detail"]["values"] == {"rate": "2/minute"}
    assert entries[0]["detail"]["until"] > entries[0]["at"] + 3500


async def test_the_admin_api_answers_loopback_only_by_default(
    upstream: FakeUpstream, gateway_process: GatewayStarter, tmp_path: Path
) -> None:
    policies = write_policies(tmp_path)
    gateway = await gateway_process(upstream.url, GATEWAY_RATELIMIT_CONFIG=policies)
    async with aiohttp.ClientSession() as session:
        url = f"{gateway.admin_url}/limits/users/max/overrides/default"
        body = {"burst": 7, "until": "1h", "reason": "vip", "by": "anna"}
        async with session.put(url, json=body) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["values"] == {"burst": 7}
        async with session.put(url, json={"burst": 0, "reason": "x"}) as resp:
            assert resp.status == 400
            assert "burst" in (await resp.json())["detail"]
        async with session.get(f"{gateway.admin_url}/limits/overrides") as resp:
            assert [o["user"] for o in await resp.json()] == ["max"]
        async with session.delete(url, params={"reason": "done"}) as resp:
            assert resp.status == 200
    closed = await gateway_process(
        upstream.url, GATEWAY_RATELIMIT_CONFIG=policies, GATEWAY_ADMIN_API_ALLOW="10.0.0.0/8"
    )
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{closed.admin_url}/limits/overrides") as resp:
            assert resp.status == 403  # 127.0.0.1 is not in the list
        async with session.get(f"{closed.admin_url}/metrics") as resp:
            assert resp.status == 200  # Prometheus is not affected


def test_which_peers_the_admin_api_allows() -> None:
    default = GatewaySettings(
        redis_url="redis://127.0.0.1", gateway_upstream_url="http://127.0.0.1"
    ).gateway_admin_api_allow
    assert allowed("127.0.0.1", default) and allowed("::1", default)
    assert allowed("::ffff:127.0.0.1", default)
    assert not allowed("192.0.2.10", default)
    assert not allowed("2001:db8::1", default)
    assert not allowed(None, default) and not allowed("unix-socket", default)


async def test_overrides_survive_a_redis_that_stops_answering() -> None:
    """A refresh that fails keeps the overrides already loaded (and warns once)."""
    from gateway.limiting.overrides import Override, Overrides

    class Flaky:
        fail = False

        async def version(self) -> int:
            if self.fail:
                raise ConnectionError("redis is gone")
            return 1

        async def all(self) -> dict[tuple[str, str], Override]:
            return {("u", "default"): Override("u", "default", {"burst": 4}, None, "r", "t", 0)}

    store = Flaky()
    overrides = Overrides(store, 60)  # type: ignore[arg-type]
    assert await overrides.refresh()
    policy = parse_policies(POLICIES, "t").default
    assert overrides.apply(policy, "u").burst == 4
    store.fail = True
    assert not await overrides.refresh()
    assert overrides.apply(policy, "u").burst == 4
    assert overrides.apply(policy, "someone else") is policy
