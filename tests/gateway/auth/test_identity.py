"""Whom the gateway believes (issue 13), each finding as a test that failed before the fix:
header trust, the anonymous namespace, failed authentication counted, per-rule address
ceilings, route labels no client can invent."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest

from gateway.auth.identity import Identity
from gateway.limiting.limiter import Limiter
from gateway.limiting.policies import parse_policies
from gateway.metrics import Metrics, metrics_key
from gateway.serving.server import identity_warning
from gateway.settings import GatewaySettings
from tests.gateway.conftest import FakeUpstream, GatewayFactory
from tests.gateway.limiting.test_ratelimit import policy_file

JWT_SECRET = "s" * 40


def forwarded_user(seen: dict[str, Any]) -> list[str]:
    return [v for n, v in seen["headers"] if n.lower() == "x-user-id"]


@pytest.mark.parametrize(
    ("mode", "trusted", "believed"),
    [
        ("trusted", "", False),  # the default: nobody is trusted, the header is ignored
        ("trusted", "127.0.0.1/32", True),  # an authenticating proxy in front set it
        ("any", "", True),  # development
        ("off", "127.0.0.1/32", False),  # never, not even from a trusted proxy
    ],
)
async def test_x_user_id_is_believed_only_where_the_mode_says(
    upstream: FakeUpstream,
    make_gateway: GatewayFactory,
    mode: str,
    trusted: str,
    believed: bool,
) -> None:
    client = await make_gateway(
        upstream.url, gateway_user_id_header=mode, gateway_trusted_proxies=trusted
    )
    resp = await client.get("/echo", headers={"X-User-Id": "alice"})
    assert resp.status == 200
    assert forwarded_user(await resp.json()) == (["alice"] if believed else ["ip:127.0.0.1"])
    # A header that is not believed is not an error either: the client is its address.
    resp = await client.get("/echo", headers={"X-User-Id": "not a valid id"})
    assert resp.status == (400 if believed else 200)


async def test_anonymous_ids_cannot_be_claimed_by_header_or_token(
    upstream: FakeUpstream, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(upstream.url)  # X-User-Id believed from anyone
    for claimed in ("ip:127.0.0.1", "IP:::1", "ip:10.0.0.7"):
        resp = await client.get("/echo", headers={"X-User-Id": claimed})
        assert resp.status == 400, claimed
        assert (await resp.json())["header"] == "X-User-Id"
    client = await make_gateway(upstream.url, gateway_jwt_secret=JWT_SECRET)
    token = jwt.encode({"sub": "ip:127.0.0.1", "exp": int(time.time()) + 60}, JWT_SECRET)
    resp = await client.get("/echo", headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 401
    assert "anonymous" in (await resp.json())["detail"]
    assert upstream.state.seen == []


def ceiling_only(tmp_path: Path, burst: int = 100) -> Path:
    return policy_file(tmp_path, rate="1000/second", burst=100000, ip_rate="1/minute",
                       ip_burst=burst)  # fmt: skip


async def test_a_flood_of_bad_tokens_meets_429(
    upstream: FakeUpstream, make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    client = await make_gateway(
        upstream.url, gateway_jwt_secret=JWT_SECRET, gateway_ratelimit_config=ceiling_only(tmp_path)
    )
    statuses = []
    for _ in range(300):
        resp = await client.get("/echo", headers={"Authorization": "Bearer a.b.c"})
        statuses.append(resp.status)
        if resp.status == 401:
            assert '"ip"' in resp.headers["RateLimit-Policy"]
        await resp.read()
    assert statuses == [401] * 100 + [429] * 200
    assert upstream.state.seen == []


async def test_a_flood_of_malformed_ids_meets_429(
    upstream: FakeUpstream, make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    client = await make_gateway(upstream.url, gateway_ratelimit_config=ceiling_only(tmp_path, 50))
    statuses = []
    for _ in range(120):
        resp = await client.get("/echo", headers={"X-User-Id": "bad id"})
        statuses.append(resp.status)
        await resp.read()
    assert statuses == [400] * 50 + [429] * 70


CHAT_CEILING = """
[default]
rate = "1000/second"
burst = 100000

[[rules]]
name = "chat"
methods = ["POST"]
path_prefix = "/echo/chat"
rate = "20/minute"
burst = 5
address_rate = "5/minute"
address_burst = 5
"""


async def test_rotating_ids_on_the_chat_rule_meets_its_address_ceiling(
    upstream: FakeUpstream, make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    path = policy_file(tmp_path, text=CHAT_CEILING)
    client = await make_gateway(upstream.url, gateway_ratelimit_config=path)
    statuses, violated = [], []
    for _ in range(30):
        resp = await client.post("/echo/chat", headers={"X-User-Id": uuid.uuid4().hex})
        statuses.append(resp.status)
        if resp.status == 429:
            violated.append((await resp.json())["violated-policies"])
        else:
            assert '"chat-address";q=5;w=60' in resp.headers["RateLimit-Policy"]
            await resp.read()
    assert statuses == [200] * 5 + [429] * 25
    assert violated == [["chat-address"]] * 25
    # The same ids on another path are not held back by the chat rule's ceiling.
    resp = await client.post("/echo/other", headers={"X-User-Id": uuid.uuid4().hex})
    assert resp.status == 200


async def test_anonymous_ipv6_clients_share_their_64s_buckets(redis_url: str) -> None:
    policies = parse_policies(CHAT_CEILING, "test")
    limiter = Limiter(object(), policies, Metrics(), prefix="t:", timeout=1, divisor=1)

    def key(address: str) -> str:
        _, _, takes = limiter.plan("GET", "/x", Identity("ip", address), address)
        return takes[0].key

    assert key("2001:db8::1") == key("2001:db8::ffff:2")  # one /64
    assert key("2001:db8::1") != key("2001:db8:0:1::1")  # the next /64
    assert key("192.0.2.1") != key("192.0.2.2")


async def test_junk_paths_never_become_route_labels(
    upstream: FakeUpstream, make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    path = policy_file(tmp_path, text='[default]\nrate = "1/minute"\nburst = 1\n')
    client = await make_gateway(upstream.url, gateway_ratelimit_config=path)
    for i in range(300):  # each its own label in the old scheme, and answered 429
        resp = await client.get(f"/junk/{uuid.uuid4().hex[:12]}/{i}", headers={"X-User-Id": "j"})
        await resp.read()
    resp = await client.get("/echo/items/42", headers={"X-User-Id": "legit"})
    assert resp.status == 200
    text, _ = client.app[metrics_key].render()
    labels = set(re.findall(r'gateway_http_requests_total\{[^}]*route="([^"]*)"', text.decode()))
    assert labels == {"other", "/echo/items/{id}"}


def test_warned_at_boot_when_anyone_is_believed_beyond_loopback() -> None:
    def settings(host: str, mode: str) -> GatewaySettings:
        return GatewaySettings(
            _env_file=None,
            redis_url="redis://127.0.0.1:6379",
            gateway_upstream_url="http://127.0.0.1:8000",
            gateway_host=host,
            gateway_user_id_header=mode,
        )

    warning = identity_warning(settings("0.0.0.0", "any"))
    assert warning is not None and "GATEWAY_USER_ID_HEADER=any" in warning
    assert identity_warning(settings("127.0.0.1", "any")) is None
    assert identity_warning(settings("::1", "any")) is None
    assert identity_warning(settings("0.0.0.0", "trusted")) is None


async def test_both_documents_say_whose_the_anonymous_namespace_is(
    chat_service: str, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(chat_service)
    gateway = json.dumps(await (await client.get("/openapi.json")).json())
    assert "not starting with `ip:`" in gateway
    async with client.session.get(f"{chat_service}/openapi.json") as resp:
        chat = json.dumps(await resp.json())
    assert "`ip:<address>` for an anonymous client" in chat
