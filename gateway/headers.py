"""The headers the gateway composes, pure: the RateLimit fields of a decision, and
X-Forwarded-For through a trusted proxy."""

from __future__ import annotations

import math

from gateway.ratelimit import Decision, Verdict


def append_forwarded_for(existing: list[str], peer: str) -> str:
    """X-Forwarded-For from a trusted proxy, with that proxy appended.

    From anyone else the incoming chain is unverifiable and the upstream gets only the peer, so
    it never sees a client's invented hops.
    """
    if existing:
        return f"{', '.join(v.strip() for v in existing)}, {peer}"
    return peer


def limit_headers(decision: Decision) -> dict[str, str]:
    """The rate-limit fields of draft-ietf-httpapi-ratelimit-headers-10 plus the legacy trio.

    `RateLimit-Policy` lists every policy that applied, `RateLimit` their state: `r` the whole
    tokens left, `t` the seconds until at least one token is there (0 when r >= 1). The
    X-RateLimit-* fields describe the tightest policy alone; their Reset is the seconds until
    its bucket is full again. A policy counted nowhere (failure_mode open while Redis is down)
    is listed in the policy field only.
    """
    verdicts = decision.verdicts
    members = [v.policy.member for v in verdicts]
    state = []
    if decision.concurrency is not None:
        members.append(decision.concurrency[0].concurrent_member)
    out = {"RateLimit-Policy": members[0] if len(members) == 1 else ", ".join(members)}
    tight = None
    for v in verdicts:
        if not v.known:
            continue
        t = math.ceil(v.next_token - 1e-6) if v.next_token > 0 else 0
        state.append(f"{v.policy.quoted};r={v.remaining if v.remaining > 0 else 0};t={t}")
        if tight is None or _tighter(v, tight):
            tight = v
    if decision.concurrency is not None:
        capped, free = decision.concurrency
        state.append(f'"{capped.concurrent_name}";r={free};t={0 if free else 1}')
    if state:
        out["RateLimit"] = ", ".join(state)
    if tight is not None:
        out["X-RateLimit-Limit"] = str(tight.policy.burst)
        out["X-RateLimit-Remaining"] = str(tight.remaining if tight.remaining > 0 else 0)
        out["X-RateLimit-Reset"] = str(math.ceil(tight.reset - 1e-6) if tight.reset > 0 else 0)
    return out


def _tighter(a: Verdict, b: Verdict) -> bool:
    """Whether `a` is the one to show in X-RateLimit-*: a denying verdict with the longest
    wait, else the one with the fewest tokens left (then the longest to refill)."""
    if a.allowed != b.allowed:
        return not a.allowed
    if not a.allowed:
        return a.retry_after > b.retry_after
    return (a.remaining, -a.reset) < (b.remaining, -b.reset)
