"""What the limiter answers: one verdict per policy, a request's decision, and its 429.

Pure data and rendering: nothing here talks to Redis. `refunded` shows a denied request's
verdicts as they stand once its tokens are back, so the RateLimit fields tell the truth.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

from gateway.errors import GatewayError, RateLimited
from gateway.limiting.buckets import Take
from gateway.limiting.leases import Lease
from gateway.limiting.policies import Policy

CONCURRENT_RETRY_AFTER = 1  # a slot frees when a request ends: no way to know when


class Verdict(NamedTuple):
    """One policy's answer for one request. `known` is False under failure_mode open."""

    policy: Policy
    allowed: bool
    remaining: int
    retry_after: float
    next_token: float
    reset: float
    known: bool = True


class Decision:
    """All verdicts for one request; `degraded` when made without Redis. `reservation` is the
    token budget's take (settled once the answer's usage is known), `lease` the concurrency
    lease held while the request runs, `concurrency` that cap's policy and free slots."""

    __slots__ = ("allowed", "concurrency", "degraded", "lease", "reservation", "verdicts")

    def __init__(
        self, verdicts: tuple[Verdict, ...], allowed: bool, degraded: bool = False
    ) -> None:
        self.verdicts = verdicts
        self.allowed = allowed
        self.degraded = degraded
        self.reservation: tuple[Policy, Take] | None = None
        self.lease: Lease | None = None
        self.concurrency: tuple[Policy, int] | None = None

    def denial(self) -> RateLimited:
        """The 429 for a denied request: Retry-After never earlier than any denying verdict's
        wait (so never earlier than the `t` of the RateLimit header either)."""
        denied = [v for v in self.verdicts if not v.allowed]
        if not denied and self.concurrency is not None:  # the buckets had room, the cap not
            policy = self.concurrency[0]
            name = policy.concurrent_name
            detail = (
                f'concurrency cap "{name}" reached: at most {policy.concurrent} requests at '
                "once; retry when one of yours has finished"
            )
            return RateLimited(detail, [name], CONCURRENT_RETRY_AFTER, policy.plan, policy.override)
        tight_verdict = max(denied, key=lambda v: v.retry_after)
        retry_after = max(1, math.ceil(tight_verdict.retry_after - 1e-6))
        tight = tight_verdict.policy
        key = (tight.name, tight.burst, tight.rate_text, tight.cost, retry_after, tight.plan,
               tight.override, *[v.policy.name for v in denied])  # fmt: skip
        found = _DENIALS.get(key)
        if found is not None:
            return found  # never raised, only answered: one instance serves every repeat
        noun = "request" if tight.cost == 1 else f"request costing {tight.cost} tokens"
        detail = (
            f'rate limit "{tight.name}" exceeded: {tight.burst} tokens, refilled at '
            f"{tight.rate_text}; this {noun} can be retried in {retry_after} s"
        )
        denial = RateLimited(
            detail, [v.policy.name for v in denied], retry_after, tight.plan, tight.override
        )
        if len(_DENIALS) >= DENIALS_KEPT:
            _DENIALS.clear()
        _DENIALS[key] = denial
        return denial


# 429 problems by what they say: a flood of refusals repeats a handful of them.
_DENIALS: dict[tuple[object, ...], RateLimited] = {}
DENIALS_KEPT = 1024


Decided = Callable[["Decision | None", "GatewayError | None"], None]


def refunded(verdicts: tuple[Verdict, ...], takes: list[Take]) -> tuple[Verdict, ...]:
    """The verdicts as they stand once a denied request's tokens are back where they were
    taken: the headers then show what the client really has left."""
    out = []
    for verdict, take in zip(verdicts, takes, strict=True):
        if verdict.allowed and verdict.known:
            back = take.cost / verdict.policy.rate
            verdict = verdict._replace(remaining=verdict.remaining + take.cost, next_token=0.0,
                                       reset=max(0.0, verdict.reset - back))  # fmt: skip
        out.append(verdict)
    return tuple(out)
