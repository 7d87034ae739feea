"""Policy parsing and matching: pure, no Redis."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.auth.identity import Identity
from gateway.limiting.limiter import Limiter
from gateway.limiting.policies import PolicyError, load_policies, normalize_path, parse_policies
from gateway.metrics import Metrics

REPO = Path(__file__).resolve().parents[3]

GOOD = """
[default]
rate = "100/minute"
burst = 100

[ip]
rate = "600/minute"

[[rules]]
name = "chat"
methods = ["post"]
path_prefix = "/v1/chat"
rate = "20/minute"
burst = 5
failure_mode = "closed"

[[rules]]
name = "reads"
methods = ["GET"]
path_prefix = "/v1/"
rate = "2/second"
burst = 10
cost = 2
"""


def test_the_shipped_file_parses_with_the_checklist_default_and_a_chat_rule() -> None:
    policies = load_policies(REPO / "config" / "ratelimits.toml")
    assert (policies.default.rate_text, policies.default.burst) == ("100/minute", 100)
    chat = policies.match("POST", "/v1/chat")
    assert chat.name == "chat"
    assert chat.burst < policies.default.burst
    assert policies.ip is not None


def test_values_defaults_and_header_members() -> None:
    policies = parse_policies(GOOD, "t.toml", default_failure_mode="open")
    assert policies.default.rate == pytest.approx(100 / 60)
    assert policies.default.failure_mode == "open"  # the variable's value when none is named
    assert policies.ip is not None
    assert policies.ip.burst == 600  # burst defaults to N of the rate
    assert policies.ip.cost == 1
    chat = policies.rules[0].policy
    assert chat.failure_mode == "closed"
    # q = burst, w = seconds for an empty bucket to refill: 5 / (20/60 per s) = 15
    assert chat.member == '"chat";q=5;w=15'
    assert policies.default.member == '"default";q=100;w=60'
    assert policies.rules[1].policy.cost == 2


def test_first_matching_rule_wins_then_default() -> None:
    policies = parse_policies(GOOD, "t.toml")
    assert policies.match("POST", "/v1/chat").name == "chat"
    assert policies.match("POST", "/v1/chat/extra").name == "chat"
    assert policies.match("POST", "/v1/chatter").name == "default"  # segment-wise prefix
    assert policies.match("GET", "/v1/chat").name == "reads"
    assert policies.match("HEAD", "/v1/conversations").name == "reads"  # GET includes HEAD
    assert policies.match("DELETE", "/v1/conversations/1").name == "default"
    assert policies.match("GET", "/healthz").name == "default"


@pytest.mark.parametrize(
    "path", ["/v1//chat", "/v1/./chat", "/v1/x/../chat", "//v1/chat/", "/v1/chat/."]
)
def test_a_path_spelled_differently_still_meets_its_rule(path: str) -> None:
    assert parse_policies(GOOD, "t.toml").match("POST", path).name == "chat"


def test_normalize_path() -> None:
    assert normalize_path("/a/b") == "/a/b"
    assert normalize_path("/a//b/./c/../d/") == "/a/b/d/"
    assert normalize_path("/../..") == "/"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[ip]\nrate = "1/second"', "default: missing"),
        ('[default]\nrate = "100/fortnight"', "default.rate: must be"),
        ('[default]\nrate = "0/minute"', "default.rate: must be"),
        ("[default]\nburst = 3", "default.rate: missing"),
        ('[default]\nrate = "1/second"\nburst = 0', "default.burst: must be a whole number >= 1"),
        ('[default]\nrate = "1/second"\nburst = 2.5', "default.burst: must be a whole number"),
        ('[default]\nrate = "1/second"\nburst = 2\ncost = 3', "default.cost: 3 exceeds burst 2"),
        ('[default]\nrate = "1/second"\nfailure_mode = "maybe"', "default.failure_mode: must be"),
        ('[default]\nrate = "1/second"\nbrust = 3', "default.brust: unknown key"),
        ('[default]\nrate = "1/second"\n[extra]', "extra: unknown section"),
        (
            '[default]\nrate = "1/second"\n[[rules]]\nname = "Chat!"\npath_prefix = "/x"\n'
            'rate = "1/second"',
            "rules[0].name: must match",
        ),
        (
            '[default]\nrate = "1/second"\n[[rules]]\nname = "ip"\npath_prefix = "/x"\n'
            'rate = "1/second"',
            'rules[0].name: "ip" is already used',
        ),
        (
            '[default]\nrate = "1/second"\n[[rules]]\nname = "a"\npath_prefix = "x"\n'
            'rate = "1/second"',
            "rules[0].path_prefix: missing or not starting with",
        ),
        (
            '[default]\nrate = "1/second"\n[[rules]]\nname = "a"\npath_prefix = "/x"\n'
            'rate = "1/second"\nmethods = "POST"',
            "rules[0].methods: must be a list",
        ),
        ("[default\n", "not valid TOML"),
    ],
)
def test_every_bad_key_is_named(text: str, problem: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policies(text, "bad.toml")
    assert any(line.startswith(problem) for line in caught.value.problems), caught.value.problems
    assert str(caught.value).startswith("bad.toml: ")


def test_all_problems_at_once() -> None:
    text = '[default]\nrate = "x"\nburst = -1\n[[rules]]\nname = "a"\nrate = "1/day"\n'
    with pytest.raises(PolicyError) as caught:
        parse_policies(text, "bad.toml")
    keys = [line.split(":")[0] for line in caught.value.problems]
    assert keys == ["default.rate", "default.burst", "rules[0].path_prefix"]


def test_missing_file_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no such file \\(GATEWAY_RATELIMIT_CONFIG\\)"):
        load_policies(tmp_path / "absent.toml")


def test_cost_zero_exempts_from_its_own_bucket_not_from_the_ceiling() -> None:
    """A cost-0 rule takes nothing from any bucket of its own; the `[ip]` ceiling still counts."""
    text = (
        '[default]\nrate = "1/second"\n[ip]\nrate = "10/second"\n'
        '[[rules]]\nname = "free"\npath_prefix = "/healthz"\nrate = "1/second"\ncost = 0\n'
    )
    limiter = Limiter(
        None, parse_policies(text, "t.toml"), Metrics(), prefix="t:", timeout=1, divisor=1
    )
    alice = Identity("header", "alice")
    policy, applied, takes = limiter.plan("GET", "/healthz", alice, "127.0.0.1")
    assert policy.name == "free"
    assert [p.name for p in applied] == ["ip"]
    assert [t.key.split(":")[2] for t in takes] == ["ip"]
    policy, applied, takes = limiter.plan("GET", "/v1/conversations", alice, "127.0.0.1")
    assert [p.name for p in applied] == ["default", "ip"]
    assert [t.cost for t in takes] == [1, 1]
