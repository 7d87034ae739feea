"""Token budgets and concurrency caps: real Redis, the real chat service (local model), the
fake upstream's streams."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from gateway.limiting.policies import parse_policies
from gateway.limiting.usage import UsageWatcher, event_tokens
from gateway.metrics import metrics_key
from tests.conftest import GatewayStarter, wait_until
from tests.gateway.conftest import FakeUpstream, GatewayFactory
from tests.gateway.limiting.test_ratelimit import parse_list, policy_file, user
from tests.support.processes import Service
from tests.support.sse import events

BUDGET = """
[default]
rate = "1000/second"
burst = 1000

[[rules]]
name = "chat"
methods = ["POST"]
path_prefix = "/v1/chat"
rate = "1000/second"
burst = 1000
tokens = "1000/day"
tokens_burst = 1000
tokens_estimate = {estimate}

[[rules]]
name = "streams"
path_prefix = "/sse"
rate = "1000/second"
burst = 1000
tokens = "1000/day"
tokens_estimate = 5
concurrent = 2
"""


def budget_file(tmp_path: Path, estimate: int = 1) -> Path:
    return policy_file(tmp_path, text=BUDGET.format(estimate=estimate))


async def chat(session: Any, url: str, who: dict[str, str]) -> tuple[int, int | None, Any]:
    """One streamed chat: (status, total tokens of its `done` event, response headers)."""
    async with session.post(f"{url}/v1/chat", json={"message": "Tell me about limits"},
                            headers=who) as resp:  # fmt: skip
        if resp.status != 200:
            await resp.read()
            return resp.status, None, resp.headers
        used = None
        async for name, data in events(resp):
            if name == "done":
                used = data["usage"]["total_tokens"]
        return resp.status, used, resp.headers


# --- parsing, pure -------------------------------------------------------------------------


def test_usage_is_found_in_every_format_and_across_chunk_boundaries() -> None:
    ours = (
        b'event: delta\ndata: {"content":"hi"}\n\nevent: done\ndata: {"conversation_id":"c",'
        b'"message_id":1,"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\n\n'
    )
    watcher = UsageWatcher("text/event-stream; charset=utf-8")
    for i in range(0, len(ours), 5):  # five bytes at a time
        watcher.feed(ours[i : i + 5])
    watcher.close()
    assert watcher.tokens == 7
    openai = (
        b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":5}}\n\n'
        b"data: [DONE]\n\n"
    )
    watcher = UsageWatcher("text/event-stream")
    watcher.feed(openai)
    watcher.close()
    assert watcher.tokens == 15
    watcher = UsageWatcher("application/json")
    watcher.feed(b'{"content":"x","usage":{"total_tokens":')
    watcher.feed(b"42}}")
    watcher.close()
    assert watcher.tokens == 42
    assert event_tokens(b'data: {"usage": "lots"}') is None
    watcher = UsageWatcher("text/event-stream")
    watcher.feed(b"data: no usage here\n\n")
    watcher.close()
    assert watcher.tokens is None


def test_budget_policies_parse_and_render() -> None:
    policies = parse_policies(BUDGET.format(estimate=3), "t.toml")
    chat_policy = policies.match("POST", "/v1/chat")
    assert chat_policy.tokens is not None
    assert chat_policy.tokens.member == '"chat-tokens";q=1000;w=86400;pixelcraft-unit="tokens"'
    streams = policies.match("GET", "/sse")
    assert streams.concurrent_member == '"streams-concurrent";q=2;qu="concurrent-requests"'
    no_estimate = parse_policies(BUDGET.replace("tokens_estimate = {estimate}\n", ""), "t.toml")
    assert no_estimate.match("POST", "/v1/chat").estimate(400) == 100  # a token per 4 bytes


# --- through the gateway -------------------------------------------------------------------


async def test_denied_once_settled_usage_exceeds_the_budget_not_before(
    make_gateway: GatewayFactory,
    chat_service: str,
    tmp_path: Path,
) -> None:
    client: TestClient[Any, Any] = await make_gateway(
        chat_service, gateway_ratelimit_config=budget_file(tmp_path, estimate=1)
    )
    who = user()
    settled = 0
    admitted = 0
    while True:
        status, used, headers = await chat(client, "", who)
        state = parse_list(headers["RateLimit"])["chat-tokens"]
        if status == 429:
            break
        assert status == 200
        assert used is not None
        # admitted only while the earlier streams' settled usage left at least 1 token
        assert settled <= 999, settled
        # the header shows the budget after this request's reservation of 1 token
        assert state["r"] == max(0, 1000 - settled - 1)
        settled += used
        admitted += 1
        assert admitted < 100
    # denied only once the settled usage reached the budget
    assert settled >= 1000
    assert state["r"] == 0
    metrics = client.app[metrics_key].registry
    debited = metrics.get_sample_value(
        "gateway_ratelimit_tokens_total", {"policy": "chat-tokens", "kind": "debited"}
    )
    assert debited == settled - admitted  # each reserved 1, the rest debited after the fact


async def test_an_upstream_failure_refunds_the_reservation_exactly(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    client = await make_gateway(
        "http://127.0.0.1:9", gateway_ratelimit_config=budget_file(tmp_path, estimate=100)
    )
    who = user()
    for _ in range(3):
        resp = await client.post("/v1/chat", json={"message": "hi"}, headers=who)
        assert resp.status == 502
        # each time the whole budget less this request's own reservation: the earlier ones
        # came back
        assert parse_list(resp.headers["RateLimit"])["chat-tokens"]["r"] == 900
    refunded = client.app[metrics_key].registry.get_sample_value(
        "gateway_ratelimit_tokens_total", {"policy": "chat-tokens", "kind": "refunded"}
    )
    assert refunded == 300


async def test_two_gateways_share_one_users_budget(
    gateway_process: GatewayStarter,
    chat_service: str,
    tmp_path: Path,
) -> None:
    path = budget_file(tmp_path, estimate=1)
    gateways = [await gateway_process(chat_service, GATEWAY_RATELIMIT_CONFIG=path)
                for _ in range(2)]  # fmt: skip
    who = user()
    settled = 0
    async with aiohttp.ClientSession() as session:

        async def debited(gateway: Service) -> float:
            async with session.get(f"{gateway.admin_url}/metrics") as resp:
                for line in (await resp.text()).splitlines():
                    if line.startswith('gateway_ratelimit_tokens_total{kind="debited",'):
                        return float(line.rsplit(" ", 1)[1])
            return 0.0

        for i in range(100):
            gateway = gateways[i % 2]
            before = await debited(gateway)
            status, used, _ = await chat(session, gateway.url, who)
            if status == 429:
                break
            assert status == 200 and used is not None
            assert settled <= 999
            settled += used
            goal = before + used - 1

            async def applied(gateway: Service = gateway, goal: float = goal) -> bool:
                return await debited(gateway) >= goal

            await wait_until(applied, within=5)  # settled in Redis before the other asks
        assert settled >= 1000
        assert i >= 4  # both gateways took turns


async def test_a_third_stream_waits_for_one_of_two(
    make_gateway: GatewayFactory, upstream: FakeUpstream, tmp_path: Path
) -> None:
    client = await make_gateway(upstream.url, gateway_ratelimit_config=budget_file(tmp_path))
    who = user()
    first = await client.get("/sse", headers=who)
    second = await client.get("/sse", headers=who)
    assert first.status == second.status == 200
    policy = parse_list(second.headers["RateLimit-Policy"])
    assert policy["streams-concurrent"] == {"q": 2, "qu": "concurrent-requests"}
    assert parse_list(second.headers["RateLimit"])["streams-concurrent"]["r"] == 0
    third = await client.get("/sse", headers=who)
    assert third.status == 429
    body = await third.json()
    assert body["violated-policies"] == ["streams-concurrent"]
    assert "Retry-After" in third.headers
    other = await client.get("/sse", headers=user())  # someone else has slots of their own
    assert other.status == 200
    other.close()
    upstream.state.events.put_nowait(None)  # one of the streams ends...
    await wait_until(lambda: first.content.at_eof() or second.content.at_eof(), within=5)

    async def admitted() -> bool:
        resp = await client.get("/sse", headers=who)
        ok = resp.status == 200
        resp.close()
        return ok

    await wait_until(admitted, within=5)  # ...and its slot is free again
    first.close()
    second.close()


async def test_a_killed_gateway_frees_its_leases_within_their_lifetime(
    gateway_process: GatewayStarter,
    upstream: FakeUpstream,
    tmp_path: Path,
) -> None:
    env = {"GATEWAY_RATELIMIT_CONFIG": budget_file(tmp_path), "GATEWAY_RATELIMIT_LEASE_SECONDS": 2}
    doomed = await gateway_process(upstream.url, **env)
    who = user()
    async with aiohttp.ClientSession() as session:
        streams = [await session.get(f"{doomed.url}/sse", headers=who) for _ in range(2)]
        assert [s.status for s in streams] == [200, 200]
        survivor = await gateway_process(upstream.url, **env)
        async with session.get(f"{survivor.url}/sse", headers=who) as resp:
            assert resp.status == 429  # the two leases live on in Redis
        doomed.proc.send_signal(signal.SIGKILL)
        await doomed.proc.wait()
        loop = asyncio.get_running_loop()
        killed = loop.time()

        async def admitted() -> bool:
            async with session.get(f"{survivor.url}/sse", headers=who) as resp:
                return resp.status == 200

        await wait_until(admitted, within=10)
        assert loop.time() - killed < 2 + 1.5  # within the lease's lifetime (and a poll)
        for stream in streams:
            stream.close()


async def test_events_still_flow_one_by_one_while_usage_is_watched(
    make_gateway: GatewayFactory, upstream: FakeUpstream, tmp_path: Path
) -> None:
    client = await make_gateway(upstream.url, gateway_ratelimit_config=budget_file(tmp_path))
    resp = await client.get("/sse", headers=user())
    assert resp.status == 200
    for i in range(5):  # each event arrives before the next is even written
        upstream.state.events.put_nowait({"n": i})
        line = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
        assert json.loads(line.split(b"data: ", 1)[1]) == {"n": i}
    upstream.state.events.put_nowait({"usage": {"total_tokens": 42}})
    upstream.state.events.put_nowait(None)
    await resp.read()
    registry = client.app[metrics_key].registry

    def settled() -> bool:
        debited = registry.get_sample_value(
            "gateway_ratelimit_tokens_total", {"policy": "streams-tokens", "kind": "debited"}
        )
        return bool(debited == 42 - 5)

    await wait_until(settled, within=5)
