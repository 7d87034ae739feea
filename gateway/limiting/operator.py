"""What an operator does to one user's limits: look, override, remove, refill, read the audit.

Shared by the CLI (`python -m gateway limits`, gateway.limiting.cli) and the admin port's JSON API
(gateway.limiting.admin); both talk to Redis directly, never to a gateway process, so they work
with any number of replicas. Each change is written to the audit stream (gateway.limiting.
overrides) with who made it and why.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.limiting.limiter import bucket_key, lease_key
from gateway.limiting.overrides import Override, OverrideStore
from gateway.limiting.policies import (
    DEFAULT_PLAN,
    PLAN_KEYS,
    Policies,
    Policy,
    PolicyError,
    override,
)
from gateway.limiting.scripts import LuaScript
from pixelcraft.contract import ANONYMOUS_PREFIX, USER_ID, reserved

RELATIVE = re.compile(r"^\+?(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class OperatorError(ValueError):
    """A request the operator made cannot be carried out; the message says which part."""


def parse_until(text: str, now: float | None = None) -> float:
    """`--until`: a duration from now (`30m`, `+2h`, `7d`) or an ISO 8601 time (UTC unless it
    says otherwise), as Unix time; OperatorError unless it is in the future."""
    now = time.time() if now is None else now
    relative = RELATIVE.match(text.strip())
    if relative:
        at = now + float(relative[1]) * UNITS[relative[2]]
    else:
        try:
            moment = datetime.fromisoformat(text.strip())
        except ValueError:
            raise OperatorError(
                f"until: {text!r} is neither a duration (30m, 2h, 7d) nor an ISO 8601 time"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        at = moment.timestamp()
    if at <= now:
        raise OperatorError(f"until: {text!r} is not in the future")
    return at


def check_user(user: str) -> str:
    if not USER_ID.match(user):
        raise OperatorError(f"user: {user!r} must match {USER_ID.pattern}")
    return user


def required_reason(reason: str) -> str:
    if not reason.strip():
        raise OperatorError("reason: required (it goes to the audit stream)")
    return reason.strip()


def identities(user: str) -> list[tuple[str, str]]:
    """The identities a user's buckets may be keyed on: an anonymous client by its address,
    a named user as a token's `sub` and as a believed X-User-Id."""
    if reserved(user):
        return [("ip", user[len(ANONYMOUS_PREFIX) :])]
    return [("jwt", user), ("header", user)]


@dataclass(frozen=True, slots=True)
class Bucket:
    """One bucket of a user as Redis holds it now."""

    policy: str
    plan: str
    identity: str  # jwt, header or ip
    remaining: int
    burst: int
    rate: str
    reset: float  # seconds until full
    override: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "plan": self.plan,
            "identity": self.identity,
            "remaining": self.remaining,
            "burst": self.burst,
            "rate": self.rate,
            "reset_seconds": round(self.reset, 3),
            "override": self.override,
        }


class LimitsOperator:
    def __init__(self, client: Any, policies: Policies, prefix: str) -> None:
        self.client = client
        self.policies = policies
        self.prefix = f"{prefix}rl:"
        self.store = OverrideStore(client, prefix)
        self.script = LuaScript("token_bucket.lua")

    def user_policy(self, name: str) -> Policy:
        policy = self.policies.named(name)
        if policy is None:
            known = ", ".join(p.name for p in self.policies.users())
            raise OperatorError(f"policy: no user policy {name!r} (known: {known})")
        return policy

    def versions(self, policy: Policy) -> list[Policy]:
        """The policy and every plan's version of it."""
        return [policy, *(plans[policy.name] for plans in self.policies.plans.values())]

    def buckets_of(self, user: str, policies: list[Policy]) -> list[tuple[str, Policy, str]]:
        """(Redis key, bucket policy, identity kind) of each policy's bucket and its token
        budget's, for every identity the user's buckets may be keyed on."""
        return [
            (bucket_key(self.prefix, bucket.bucket, kind, value), bucket, kind)
            for policy in policies
            for bucket in (policy, policy.tokens)
            if bucket is not None
            for kind, value in identities(user)
        ]

    async def show(self, user: str) -> dict[str, Any]:
        """Plan(s) seen, overrides, each bucket in Redis, leases held."""
        check_user(user)
        overrides = await self.store.all()
        now = time.time()
        mine = {p: o for (u, p), o in overrides.items() if u == user}
        effective = []
        for base in self.policies.users():
            for policy in self.versions(base):
                entry = mine.get(policy.name)
                if entry is not None and entry.live(now):
                    with contextlib.suppress(PolicyError):  # the gateways ignore it too
                        policy = override(policy, entry.values)
                effective.append(policy)
        candidates = self.buckets_of(user, effective)
        pipe = self.client.pipeline(transaction=False)
        for key, *_ in candidates:
            pipe.exists(key)
        present = await pipe.execute()
        buckets = []
        for (key, policy, kind), exists in zip(candidates, present, strict=True):
            if not exists:
                continue
            interval, burst = policy.args
            reply = await self.script.call(self.client, [key], interval, burst, 0, 0)
            buckets.append(
                Bucket(
                    policy.name,
                    policy.plan,
                    kind,
                    int(reply[1]),
                    policy.burst,
                    policy.rate_text,
                    int(reply[4]) / 1e6,
                    policy.override,
                )
            )
        leases = {}
        now_ms = int(now * 1000)
        for base in self.policies.users():
            if not any(p.concurrent for p in self.versions(base)):
                continue
            held = 0
            for kind, value in identities(user):
                key = lease_key(self.prefix, base.name, kind, value)
                held += int(await self.client.zcount(key, now_ms, "+inf"))
            leases[base.concurrent_name] = held
        return {
            "user": user,
            "plans_seen": sorted({b.plan for b in buckets}) or [DEFAULT_PLAN],
            "overrides": [
                {**o.to_json(), "live": o.live(now)} for o in sorted(mine.values(), key=_by_name)
            ],
            "buckets": [b.to_json() for b in buckets],
            "leases": leases,
        }

    async def set(
        self,
        user: str,
        policy: str,
        values: dict[str, Any],
        *,
        until: float | None,
        reason: str,
        by: str,
    ) -> Override:
        """Override `policy` for `user` (every plan's version of it); OperatorError naming
        the bad option."""
        check_user(user)
        base = self.user_policy(policy)
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            raise OperatorError(f"set: give at least one of {', '.join(sorted(PLAN_KEYS))}")
        unknown = set(values) - PLAN_KEYS
        if unknown:
            raise OperatorError(f"set: unknown {', '.join(sorted(unknown))}")
        reason = required_reason(reason)
        for version in self.versions(base):
            try:
                override(version, values, where=f"{policy}@{version.plan}")
            except PolicyError as exc:
                raise OperatorError("; ".join(exc.problems)) from None
        entry = Override(user, policy, values, until, reason, by, time.time())
        await self.store.set(entry)
        return entry

    async def unset(self, user: str, policy: str, *, reason: str, by: str) -> bool:
        check_user(user)
        self.user_policy(policy)
        reason = required_reason(reason)
        return await self.store.unset(user, policy, by=by, reason=reason)

    async def reset(self, user: str, policy: str | None, *, reason: str, by: str) -> int:
        """Refill a user's buckets (one policy's, or all), every plan's; the keys deleted."""
        check_user(user)
        reason = required_reason(reason)
        bases = [self.user_policy(policy)] if policy is not None else self.policies.users()
        versions = [version for base in bases for version in self.versions(base)]
        deleted = 0
        for key, _, _ in self.buckets_of(user, versions):  # one key per command: Cluster-safe
            deleted += int(await self.client.delete(key))
        await self.store.record(
            "reset", user, policy or "*", by=by, reason=reason, detail={"keys": deleted}
        )
        return deleted

    async def list_overrides(self) -> list[dict[str, Any]]:
        now = time.time()
        entries = sorted((await self.store.all()).values(), key=lambda o: (o.user, o.policy))
        return [{**o.to_json(), "live": o.live(now)} for o in entries]

    async def audit(self, count: int = 100) -> list[dict[str, Any]]:
        return await self.store.audit(count)


def _by_name(entry: Override) -> str:
    return entry.policy
