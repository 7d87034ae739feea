"""Rate-limit policies: parsed from TOML (GATEWAY_RATELIMIT_CONFIG), validated as a whole, pure.

A policy is a token bucket: `rate` refills it, `burst` is its capacity, `cost` is what a request
takes. `[default]` applies to requests no `[[rules]]` entry matches (first match wins, by method
and path prefix); `[ip]`, when present, applies to every request as well, keyed on the client
address, so inventing user ids from one address gains nothing.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

FailureMode = Literal["local", "open", "closed"]
FAILURE_MODES: tuple[FailureMode, ...] = ("local", "open", "closed")

PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(second|minute|hour|day)s?\s*$")
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
METHOD = re.compile(r"^[A-Z]{1,16}$")
RESERVED = ("default", "ip")

IP_KEYS = {"rate", "burst", "cost", "failure_mode"}
SECTION_KEYS = IP_KEYS | {"tokens", "tokens_burst", "tokens_estimate", "concurrent",
                          "address_rate", "address_burst"}  # fmt: skip
RULE_KEYS = SECTION_KEYS | {"name", "methods", "path_prefix"}


class PolicyError(ValueError):
    """The policy file is missing or invalid; one line per problem in `problems`."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(problems))
        self.source = source
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Policy:
    """One token bucket's parameters, and how it shows in the RateLimit-Policy header."""

    name: str
    rate: float  # tokens per second
    rate_text: str  # as written: "20/minute"
    burst: int
    cost: int
    failure_mode: FailureMode
    unit: str | None = None  # "tokens" for a token budget (a vendor parameter in the headers)
    tokens: Policy | None = None  # the token budget that comes with this policy, if any
    tokens_estimate: int | None = None  # reserved per request; None: from the body's size
    concurrent: int | None = None  # requests in flight per identity, if capped
    address: Policy | None = None  # this policy's own ceiling per client address, if any

    window: int = field(init=False)
    member: str = field(init=False)
    quoted: str = field(init=False)

    def __post_init__(self) -> None:
        # w: seconds for an empty bucket to fill, the draft's window for a quota of `burst`.
        window = max(1, math.ceil(self.burst / self.rate - 1e-9))
        object.__setattr__(self, "window", window)
        # This policy as a RateLimit-Policy list member (draft-ietf-httpapi-ratelimit-headers-10
        # §3), rendered once: quota `q` = burst, window `w`.
        unit = f';pixelcraft-unit="{self.unit}"' if self.unit else ""
        object.__setattr__(self, "member", f'"{self.name}";q={self.burst};w={window}{unit}')
        object.__setattr__(self, "quoted", f'"{self.name}"')  # an sf-string: names are safe

    @property
    def interval_us(self) -> float:
        """Microseconds per token."""
        return 1e6 / self.rate

    @property
    def concurrent_name(self) -> str:
        return f"{self.name}-concurrent"

    @property
    def concurrent_member(self) -> str:
        """The cap as a RateLimit-Policy member (the draft's `qu="concurrent-requests"`)."""
        return f'"{self.concurrent_name}";q={self.concurrent};qu="concurrent-requests"'

    def estimate(self, body_bytes: int | None) -> int:
        """Tokens to reserve for a request: the configured estimate, else about one token
        per 4 bytes of body (at least 1, at most the budget's burst)."""
        assert self.tokens is not None
        if self.tokens_estimate is not None:
            return self.tokens_estimate
        return max(1, min(self.tokens.burst, -(-(body_bytes or 0) // 4)))


@dataclass(frozen=True, slots=True)
class Rule:
    policy: Policy
    methods: frozenset[str] | None  # None: every method
    prefix: str

    def matches(self, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        prefix = self.prefix
        if prefix.endswith("/"):
            return path.startswith(prefix)
        return path == prefix or path.startswith(prefix + "/")


def normalize_path(path: str) -> str:
    """`/v1//chat/./x/../y` as the router will see it: `/v1/chat/y` (no rule dodged by
    spelling a path differently)."""
    if "//" not in path and "/." not in path:
        return path
    parts: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if parts:
                parts.pop()
            continue
        parts.append(segment)
    tail = "/" if path.endswith("/") and parts else ""
    return "/" + "/".join(parts) + tail


@dataclass(frozen=True, slots=True)
class Policies:
    """Everything the limiter applies; immutable, swapped whole on SIGHUP."""

    default: Policy
    ip: Policy | None
    rules: tuple[Rule, ...]

    def match(self, method: str, path: str) -> Policy:
        """The policy for a request: the first matching rule, else the default."""
        if self.rules:
            path = normalize_path(path)
            for rule in self.rules:
                if rule.matches(method, path):
                    return rule.policy
        return self.default

    def all(self) -> list[Policy]:
        """Every bucket policy, token budgets included."""
        policies = [self.default, *(rule.policy for rule in self.rules)]
        budgets = [p.tokens for p in policies if p.tokens is not None]
        ceilings = [p.address for p in policies if p.address is not None]
        return policies + budgets + ceilings + ([self.ip] if self.ip is not None else [])


class _Reader:
    """Collects every problem of a document instead of stopping at the first."""

    def __init__(self, default_failure_mode: FailureMode) -> None:
        self.problems: list[str] = []
        self.default_failure_mode = default_failure_mode

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    def table(self, doc: dict[str, Any], key: str) -> dict[str, Any] | None:
        value = doc.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.problem(key, "must be a table")
            return None
        return value

    def policy(self, where: str, name: str, table: dict[str, Any], allowed: set[str]) -> Policy:
        for key in sorted(set(table) - allowed):
            self.problem(f"{where}.{key}", f"unknown key (known: {', '.join(sorted(allowed))})")
        rate, rate_text, count = 1.0, "1/second", 1
        raw = table.get("rate")
        if raw is None:
            self.problem(f"{where}.rate", 'missing (e.g. rate = "100/minute")')
        elif parsed := self.rate(f"{where}.rate", raw, ""):
            rate, rate_text, count = parsed
        burst = self.integer(where, "burst", table.get("burst", count), minimum=1)
        cost = self.integer(where, "cost", table.get("cost", 1), minimum=0)
        if cost > burst:
            self.problem(f"{where}.cost", f"{cost} exceeds burst {burst}: no request could pass")
        mode = table.get("failure_mode", self.default_failure_mode)
        if mode not in FAILURE_MODES:
            self.problem(f"{where}.failure_mode", f"must be one of {', '.join(FAILURE_MODES)}")
            mode = self.default_failure_mode
        failure_mode = cast(FailureMode, mode)
        tokens = None
        estimate = None
        if "tokens" in table:
            tokens = self.budget(where, name, table, failure_mode)
            if "tokens_estimate" in table:
                estimate = self.integer(where, "tokens_estimate", table["tokens_estimate"],
                                        minimum=1)  # fmt: skip
        elif "tokens_burst" in table or "tokens_estimate" in table:
            self.problem(f"{where}.tokens", "missing: tokens_burst and tokens_estimate need it")
        concurrent = None
        if "concurrent" in table:
            concurrent = self.integer(where, "concurrent", table["concurrent"], minimum=1)
        address = None
        if "address_rate" in table:
            address = self.ceiling(where, name, table, cost, failure_mode)
        elif "address_burst" in table:
            self.problem(f"{where}.address_rate", "missing: address_burst needs it")
        return Policy(name, rate, rate_text, burst, cost, failure_mode, tokens=tokens,
                      tokens_estimate=estimate, concurrent=concurrent,
                      address=address)  # fmt: skip

    def ceiling(
        self, where: str, name: str, table: dict[str, Any], cost: int, mode: FailureMode
    ) -> Policy | None:
        """`address_rate = "60/hour"` (+ `address_burst`): the policy's own ceiling per client
        address, whatever the identity (so rotating invented ids gains nothing here either)."""
        parsed = self.rate(f"{where}.address_rate", table["address_rate"], "")
        if parsed is None:
            return None
        rate, rate_text, count = parsed
        burst = self.integer(where, "address_burst", table.get("address_burst", count), minimum=1)
        if cost > burst:
            self.problem(f"{where}.address_burst", f"{burst} is below cost {cost}")
        return Policy(f"{name}-address", rate, rate_text, burst, cost, mode)

    def budget(
        self, where: str, name: str, table: dict[str, Any], mode: FailureMode
    ) -> Policy | None:
        """`tokens = "200000/day"` (+ `tokens_burst`): the policy's token budget."""
        parsed = self.rate(f"{where}.tokens", table["tokens"], " (model tokens)")
        if parsed is None:
            return None
        rate, rate_text, count = parsed
        burst = self.integer(where, "tokens_burst", table.get("tokens_burst", count), minimum=1)
        return Policy(f"{name}-tokens", rate, rate_text, burst, 0, mode, unit="tokens")

    def rate(self, where: str, raw: object, unit: str) -> tuple[float, str, int] | None:
        """ "N/period" as (per second, as written, N), or None with the problem reported."""
        match = RATE.match(raw) if isinstance(raw, str) else None
        if match is None or float(match[1]) <= 0:
            self.problem(where, 'must be "N/second", "N/minute", "N/hour" or "N/day" with N > 0'
                         + unit)  # fmt: skip
            return None
        return (float(match[1]) / PERIODS[match[2]], f"{match[1]}/{match[2]}",
                max(1, int(float(match[1]))))  # fmt: skip

    def integer(self, where: str, key: str, value: object, *, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.problem(f"{where}.{key}", f"must be a whole number >= {minimum}")
            return max(minimum, 1)
        return value

    def rule(self, index: int, table: object, names: set[str]) -> Rule | None:
        where = f"rules[{index}]"
        if not isinstance(table, dict):
            self.problem(where, "must be a table ([[rules]])")
            return None
        name = table.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            self.problem(f"{where}.name", "must match [a-z0-9][a-z0-9_-]{0,31}")
            name = f"rule{index}"
        elif name in RESERVED or name in names:
            self.problem(f"{where}.name", f'"{name}" is already used')
        names.add(name)
        policy = self.policy(where, name, table, RULE_KEYS)
        methods: frozenset[str] | None = None
        raw_methods = table.get("methods")
        if raw_methods is not None:
            if (
                not isinstance(raw_methods, list)
                or not raw_methods
                or not all(isinstance(m, str) and METHOD.match(m.upper()) for m in raw_methods)
            ):
                self.problem(f"{where}.methods", 'must be a list of HTTP methods, e.g. ["POST"]')
            else:
                upper = {m.upper() for m in raw_methods}
                if "GET" in upper:
                    upper.add("HEAD")  # a HEAD is answered by the GET route
                methods = frozenset(upper)
        prefix = table.get("path_prefix")
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            self.problem(f"{where}.path_prefix", 'missing or not starting with "/"')
            prefix = "/"
        return Rule(policy, methods, prefix)


def parse_policies(text: str, source: str, default_failure_mode: FailureMode = "local") -> Policies:
    """Policies from TOML text; PolicyError listing every problem."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(source, [f"not valid TOML: {exc}"]) from None
    reader = _Reader(default_failure_mode)
    for key in sorted(set(doc) - {"default", "ip", "rules"}):
        reader.problem(key, "unknown section (known: default, ip, rules)")
    default_table = reader.table(doc, "default")
    if default_table is None and "default" not in doc:
        reader.problem("default", "missing: the [default] section is required")
    if default_table is None:
        default_table = {"rate": "1/second"}  # stands in so the other problems still show
    default = reader.policy("default", "default", default_table, SECTION_KEYS)
    ip_table = reader.table(doc, "ip")
    ip = reader.policy("ip", "ip", ip_table, IP_KEYS) if ip_table is not None else None
    rules: list[Rule] = []
    raw_rules = doc.get("rules", [])
    if not isinstance(raw_rules, list):
        reader.problem("rules", "must be an array of tables ([[rules]])")
        raw_rules = []
    names: set[str] = set()
    for index, table in enumerate(raw_rules):
        rule = reader.rule(index, table, names)
        if rule is not None:
            rules.append(rule)
    if reader.problems:
        raise PolicyError(source, reader.problems)
    return Policies(default, ip, tuple(rules))


def load_policies(path: Path, default_failure_mode: FailureMode = "local") -> Policies:
    """Read and parse the policy file; PolicyError (never OSError) when it cannot be used."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(str(path), ["no such file (GATEWAY_RATELIMIT_CONFIG)"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(str(path), [f"cannot be read: {exc}"]) from None
    return parse_policies(text, str(path), default_failure_mode)
