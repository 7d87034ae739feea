"""limit_block: the RateLimit-Policy, RateLimit and X-RateLimit-* fields of a decision."""

from __future__ import annotations

import pytest

from gateway.limiting.decisions import Decision, Verdict
from gateway.limiting.headers import limit_block
from gateway.limiting.policies import Policies, Policy, parse_policies

TEXT = """
[default]
rate = "10/minute"
burst = 10

[ip]
rate = "600/minute"

[[rules]]
name = "chat"
path_prefix = "/v1/chat"
rate = "20/minute"
burst = 5
concurrent = 2
"""


@pytest.fixture
def policies() -> Policies:
    return parse_policies(TEXT, "t.toml")


def fields(block: bytes) -> dict[str, str]:
    text = block.decode()
    assert text.endswith("\r\n")
    return dict(line.split(": ", 1) for line in text.removesuffix("\r\n").split("\r\n"))


def verdict(
    policy: Policy,
    remaining: int,
    *,
    allowed: bool = True,
    wait: float = 0.0,
    reset: float = 0.0,
    known: bool = True,
) -> Verdict:
    return Verdict(policy, allowed, remaining, wait, wait, reset, known)


def test_one_allowed_policy(policies: Policies) -> None:
    decision = Decision((verdict(policies.default, 4, reset=36.2),), allowed=True)
    assert fields(limit_block(decision)) == {
        "RateLimit-Policy": '"default";q=10;w=60',
        "RateLimit": '"default";r=4;t=0',
        "X-RateLimit-Limit": "10",
        "X-RateLimit-Remaining": "4",
        "X-RateLimit-Reset": "37",  # whole seconds, rounded up
    }


def test_a_denial_shows_its_wait_and_is_the_tightest(policies: Policies) -> None:
    assert policies.ip is not None
    decision = Decision(
        (
            verdict(policies.default, 0, allowed=False, wait=5.2, reset=60),
            verdict(policies.ip, 599, reset=0.1),
        ),
        allowed=False,
    )
    got = fields(limit_block(decision))
    assert got["RateLimit-Policy"] == '"default";q=10;w=60, "ip";q=600;w=60'
    assert got["RateLimit"] == '"default";r=0;t=6, "ip";r=599;t=0'
    assert (got["X-RateLimit-Limit"], got["X-RateLimit-Remaining"]) == ("10", "0")
    assert got["X-RateLimit-Reset"] == "60"


def test_of_two_allowed_the_one_with_fewest_tokens_left_is_named(policies: Policies) -> None:
    assert policies.ip is not None
    chat = policies.match("POST", "/v1/chat")
    decision = Decision((verdict(chat, 3, reset=6), verdict(policies.ip, 2, reset=1)), allowed=True)
    got = fields(limit_block(decision))
    assert (got["X-RateLimit-Limit"], got["X-RateLimit-Remaining"]) == ("600", "2")
    assert got["RateLimit"] == '"chat";r=3;t=0, "ip";r=2;t=0'


def test_t_is_whole_seconds_up_and_negative_remaining_shows_zero(policies: Policies) -> None:
    decision = Decision(
        (verdict(policies.default, -3, allowed=False, wait=2.0000001, reset=0),), allowed=False
    )
    got = fields(limit_block(decision))
    assert got["RateLimit"] == '"default";r=0;t=2'  # float noise is not a second more
    assert got["X-RateLimit-Remaining"] == "0"
    decision = Decision(
        (verdict(policies.default, 0, allowed=False, wait=2.3, reset=0),), allowed=False
    )
    assert fields(limit_block(decision))["RateLimit"] == '"default";r=0;t=3'


def test_a_policy_counted_nowhere_is_only_listed(policies: Policies) -> None:
    """failure_mode open while Redis is down: no state to tell."""
    decision = Decision((verdict(policies.default, 0, known=False),), allowed=True)
    assert fields(limit_block(decision)) == {"RateLimit-Policy": '"default";q=10;w=60'}


def test_the_concurrency_cap_is_a_member_of_its_own(policies: Policies) -> None:
    chat = policies.match("POST", "/v1/chat")
    for free, t in ((0, 1), (2, 0)):
        decision = Decision((verdict(chat, 4, reset=3),), allowed=free > 0)
        decision.concurrency = (chat, free)
        got = fields(limit_block(decision))
        assert got["RateLimit-Policy"] == (
            '"chat";q=5;w=15, "chat-concurrent";q=2;qu="concurrent-requests"'
        )
        assert got["RateLimit"] == f'"chat";r=4;t=0, "chat-concurrent";r={free};t={t}'
        assert got["X-RateLimit-Limit"] == "5"  # the legacy trio names buckets only
