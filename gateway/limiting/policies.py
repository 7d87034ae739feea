"""Rate-limit policies: parsed from TOML (GATEWAY_RATELIMIT_CONFIG), validated as a whole, pure.

A policy is a token bucket: `rate` refills it, `burst` is its capacity, `cost` is what a request
takes. `[default]` applies to requests no `[[rules]]` entry matches (first match wins, by method
and path prefix); `[ip]`, when present, applies to every request as well, keyed on the client
address, so inventing user ids from one address gains nothing.

`[plans.<plan>.<policy>]` tables change a policy's rate, burst, token budget or concurrency for
the users of a plan (from a JWT claim or a trusted proxy's X-User-Plan): a plan's buckets are
keys of their own (`<policy>@<plan>`), so a user who changes plan starts on the new plan's
bucket at once. Keys a plan does not give are the policy's own. An override (per user, from
Redis: gateway.limiting.overrides) changes a policy the same way, on the plan's bucket.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

FailureMode = Literal["local", "open", "closed"]
FAILURE_MODES: tuple[FailureMode, ...] = ("local", "open", "closed")

PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(second|minute|hour|day)s?\s*$")
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
METHOD = re.compile(r"^[A-Z]{1,16}$")
RESERVED = ("default", "ip")
DEFAULT_PLAN = "default"

IP_KEYS = {"rate", "burst", "cost", "failure_mode"}
SECTION_KEYS = IP_KEYS | {"tokens", "tokens_burst", "tokens_estimate", "concurrent",
                          "address_rate", "address_burst"}  # fmt: skip
RULE_KEYS = SECTION_KEYS | {"name", "methods", "path_prefix"}
PLAN_KEYS = {"rate", "burst", "tokens", "tokens_burst", "concurrent"}
PLAN_NAME_RULE = (
    'a plan\'s name must match [a-z0-9][a-z0-9_-]{0,31} and not be "default" (the plan of '
    "everyone else: change the policies themselves)"
)
PLAN_TABLE_RULE = (
    "must be a table: [plans.<plan>.<policy>] with rate, burst, tokens, tokens_burst or concurrent"
)
PER_ADDRESS = "[ip] and address ceilings are per address, not per plan"


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
    plan: str = DEFAULT_PLAN  # whose users it applies to (a plan's version of the policy)
    override: bool = False  # one user's override (from Redis), on the plan's bucket

    window: int = field(init=False)
    member: str = field(init=False)
    quoted: str = field(init=False)
    bucket: str = field(init=False)  # the bucket's name in its Redis key
    args: tuple[str, str] = field(init=False)  # the script's interval and burst arguments

    def __post_init__(self) -> None:
        # w: seconds for an empty bucket to fill, the draft's window for a quota of `burst`.
        window = max(1, math.ceil(self.burst / self.rate - 1e-9))
        object.__setattr__(self, "window", window)
        # This policy as a RateLimit-Policy list member (draft-ietf-httpapi-ratelimit-headers-10
        # §3), rendered once: quota `q` = burst, window `w`; a plan other than the default and
        # an override are vendor parameters.
        unit = f';pixelcraft-unit="{self.unit}"' if self.unit else ""
        if self.plan != DEFAULT_PLAN:
            unit += f';pixelcraft-plan="{self.plan}"'
        if self.override:
            unit += ";pixelcraft-override"
        object.__setattr__(self, "member", f'"{self.name}";q={self.burst};w={window}{unit}')
        object.__setattr__(self, "quoted", f'"{self.name}"')  # an sf-string: names are safe
        bucket = self.name if self.plan == DEFAULT_PLAN else f"{self.name}@{self.plan}"
        object.__setattr__(self, "bucket", bucket)
        object.__setattr__(self, "args", (repr(self.interval_us), str(self.burst)))

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
    """Everything the limiter applies; immutable, swapped whole on SIGHUP. `plans`: for each
    plan, its version of every policy (those it does not change are keyed per plan all the
    same, so a change of plan is a fresh bucket)."""

    default: Policy
    ip: Policy | None
    rules: tuple[Rule, ...]
    plans: dict[str, dict[str, Policy]] = field(default_factory=dict)

    def for_plan(self, policy: Policy, plan: str) -> Policy | None:
        """`policy` as it applies to a plan's users; None for a plan that is not configured."""
        if plan == DEFAULT_PLAN:
            return policy
        versions = self.plans.get(plan)
        return None if versions is None else versions[policy.name]

    def named(self, name: str) -> Policy | None:
        """A user policy (`default` or a rule's) by name; None for any other name."""
        if name == self.default.name:
            return self.default
        return next((rule.policy for rule in self.rules if rule.policy.name == name), None)

    def users(self) -> list[Policy]:
        """The policies keyed per user: the default and the rules' (not the ceilings)."""
        return [self.default, *(rule.policy for rule in self.rules)]

    def match(self, method: str, path: str) -> Policy:
        """The policy for a request: the first matching rule, else the default."""
        if self.rules:
            path = normalize_path(path)
            for rule in self.rules:
                if rule.matches(method, path):
                    return rule.policy
        return self.default

    def all(self) -> list[Policy]:
        """Every bucket policy, token budgets and plans' versions included."""
        policies = self.users()
        for versions in self.plans.values():
            policies += versions.values()
        budgets = [p.tokens for p in policies if p.tokens is not None]
        ceilings = [p.address for p in self.users() if p.address is not None]
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

    def adjust(
        self, where: str, base: Policy, table: dict[str, Any], plan: str, *, override: bool = False
    ) -> Policy:
        """`base` with the keys of `table` changed (PLAN_KEYS), as a plan's version of it or as
        one user's override; a key not given is the policy's own."""
        for key in sorted(set(table) - PLAN_KEYS):
            self.problem(f"{where}.{key}", f"unknown key (known: {', '.join(sorted(PLAN_KEYS))})")
        rate, rate_text = base.rate, base.rate_text
        if "rate" in table and (parsed := self.rate(f"{where}.rate", table["rate"], "")):
            rate, rate_text, _ = parsed
        burst = base.burst
        if "burst" in table:
            burst = self.integer(where, "burst", table["burst"], minimum=1)
        if base.cost > burst:
            self.problem(f"{where}.burst", f"{burst} is below the policy's cost {base.cost}")
        tokens = base.tokens
        if "tokens" in table or "tokens_burst" in table:
            tokens = self.adjust_budget(where, base, table)
        if tokens is not None:
            tokens = replace(tokens, plan=plan, override=override)
        concurrent = base.concurrent
        if "concurrent" in table:
            concurrent = self.integer(where, "concurrent", table["concurrent"], minimum=1)
        return replace(base, rate=rate, rate_text=rate_text, burst=burst, tokens=tokens,
                       concurrent=concurrent, plan=plan, override=override)  # fmt: skip

    def adjust_budget(self, where: str, base: Policy, table: dict[str, Any]) -> Policy | None:
        """The token budget with `tokens` / `tokens_burst` changed (a new one if it had none)."""
        budget = base.tokens
        if "tokens" not in table and budget is None:
            self.problem(f"{where}.tokens", "missing: the policy has no token budget to change")
            return None
        rate, rate_text, burst = (budget.rate, budget.rate_text, budget.burst) if budget else (
            1.0, "1/second", 1)  # fmt: skip
        if "tokens" in table:
            parsed = self.rate(f"{where}.tokens", table["tokens"], " (model tokens)")
            if parsed is None:
                return budget
            rate, rate_text, count = parsed
            burst = burst if budget is not None else count
        if "tokens_burst" in table:
            burst = self.integer(where, "tokens_burst", table["tokens_burst"], minimum=1)
        return Policy(f"{base.name}-tokens", rate, rate_text, burst, 0, base.failure_mode,
                      unit="tokens")  # fmt: skip

    def plans(self, raw: dict[str, Any], users: list[Policy]) -> dict[str, dict[str, Policy]]:
        """`[plans.<plan>.<policy>]`: each plan's version of every user policy."""
        by_name = {policy.name: policy for policy in users}
        plans: dict[str, dict[str, Policy]] = {}
        for plan, tables in raw.items():
            where = f"plans.{plan}"
            if not NAME.match(plan) or plan == DEFAULT_PLAN:
                self.problem(where, PLAN_NAME_RULE)
                continue
            if not isinstance(tables, dict):
                self.problem(where, "must be a table of policies: [plans.<plan>.<policy>]")
                continue
            for name in tables:
                if not isinstance(tables[name], dict):
                    self.problem(f"{where}.{name}", PLAN_TABLE_RULE)
                elif name not in by_name:
                    known = ", ".join(by_name)
                    self.problem(
                        f"{where}.{name}",
                        f"no such policy to change (known: {known}; {PER_ADDRESS})",
                    )
            plans[plan] = {
                name: self.adjust(f"{where}.{name}", policy, table, plan)
                if isinstance(table := tables.get(name, {}), dict)
                else replace(policy, plan=plan)
                for name, policy in by_name.items()
            }
        return plans

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
    for key in sorted(set(doc) - {"default", "ip", "rules", "plans"}):
        reader.problem(key, "unknown section (known: default, ip, rules, plans)")
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
    raw_plans = reader.table(doc, "plans")
    users = [default, *(rule.policy for rule in rules)]
    plans = reader.plans(raw_plans, users) if raw_plans is not None else {}
    if reader.problems:
        raise PolicyError(source, reader.problems)
    return Policies(default, ip, tuple(rules), plans)


def override(base: Policy, values: dict[str, Any], where: str = "override") -> Policy:
    """`base` changed by one user's override (PLAN_KEYS); PolicyError naming each bad key."""
    reader = _Reader(base.failure_mode)
    policy = reader.adjust(where, base, values, base.plan, override=True)
    if reader.problems:
        raise PolicyError(where, reader.problems)
    return policy


def load_policies(path: Path, default_failure_mode: FailureMode = "local") -> Policies:
    """Read and parse the policy file; PolicyError (never OSError) when it cannot be used."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(str(path), ["no such file (GATEWAY_RATELIMIT_CONFIG)"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(str(path), [f"cannot be read: {exc}"]) from None
    return parse_policies(text, str(path), default_failure_mode)
