"""The RateLimit header fields of a decision, pure."""

from __future__ import annotations

import math

from gateway.limiting.decisions import Decision, Verdict


def limit_block(decision: Decision) -> bytes:
    """The rate-limit fields of draft-ietf-httpapi-ratelimit-headers-10 plus the legacy trio,
    as header lines.

    `RateLimit-Policy` lists every policy that applied, `RateLimit` their state: `r` the whole
    tokens left, `t` the seconds until at least one token is there (0 when r >= 1). The
    X-RateLimit-* fields describe the tightest policy alone; their Reset is the seconds until
    its bucket is full again. A policy counted nowhere (failure_mode open while Redis is down)
    is listed in the policy field only.
    """
    verdicts = decision.verdicts
    concurrency = decision.concurrency
    members = ", ".join([v.policy.member for v in verdicts])
    if concurrency is not None:
        member = concurrency[0].concurrent_member
        members = f"{members}, {member}" if members else member
    state = []
    tight = None
    for v in verdicts:
        if not v.known:
            continue
        next_token = v.next_token
        remaining = v.remaining
        state.append(
            f"{v.policy.quoted};r={remaining if remaining > 0 else 0};"
            f"t={math.ceil(next_token - 1e-6) if next_token > 0 else 0}"
        )
        if tight is None or _tighter(v, tight):
            tight = v
    if concurrency is not None:
        capped, free = concurrency
        state.append(f'"{capped.concurrent_name}";r={free};t={0 if free else 1}')
    lines = f"RateLimit-Policy: {members}\r\n"
    if state:
        lines += f"RateLimit: {', '.join(state)}\r\n"
    if tight is not None:
        remaining = tight.remaining if tight.remaining > 0 else 0
        reset = math.ceil(tight.reset - 1e-6) if tight.reset > 0 else 0
        lines += (
            f"X-RateLimit-Limit: {tight.policy.burst}\r\nX-RateLimit-Remaining: {remaining}\r\n"
            f"X-RateLimit-Reset: {reset}\r\n"
        )
    return lines.encode()


def _tighter(a: Verdict, b: Verdict) -> bool:
    """Whether `a` is the one to show in X-RateLimit-*: a denying verdict with the longest
    wait, else the one with the fewest tokens left (then the longest to refill)."""
    if a.allowed != b.allowed:
        return not a.allowed
    if not a.allowed:
        return a.retry_after > b.retry_after
    return (a.remaining, -a.reset) < (b.remaining, -b.reset)
