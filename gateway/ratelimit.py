"""The rate limiter: which policies apply to a request, asked of Redis, with a circuit breaker.

Each proxied request is checked against its policy (the first matching rule, else the default),
keyed on its identity, and against the `[ip]` ceiling, keyed on its client address; both in one
round trip. Denied if either bucket is short; a bucket that did take tokens for a denied request
gets them back, so a user over their limit does not drain the shared address's ceiling and the
reverse.

When a Redis round trip fails (down, stalled past the deadline, refusing the script) the breaker
opens: requests stop waiting on Redis at all and each policy follows its `failure_mode` (`local`:
an in-process bucket at a fraction of the rate; `open`: allow; `closed`: 503), while a background
task probes Redis with exponential backoff and closes the breaker when it answers again.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential, wait_random

from gateway.buckets import BucketsUnavailable, LocalBuckets, RedisBuckets, Reply, Take
from gateway.errors import GatewayError, LimiterUnavailable, RateLimited
from gateway.identity import Identity
from gateway.leases import Lease, Leases, LeasesUnavailable
from gateway.metrics import Metrics
from gateway.policies import Policies, Policy
from pixelcraft.aio import cancel

logger = logging.getLogger(__name__)

# The breaker's probe: first retry after ~50 ms, then doubling (with jitter) up to 2 s, so a
# Redis that comes back is noticed within a couple of seconds and a dead one costs ~1 probe/2 s.
PROBE_WAIT_INITIAL = 0.05
PROBE_WAIT_MAX = 2.0
KEY_CACHE = 50_000  # memoized bucket operations (about 300 bytes each)
CLOSED_RETRY_AFTER = 2  # seconds a failure_mode=closed 503 asks the client to wait
CONCURRENT_RETRY_AFTER = 1  # a slot frees when a request ends: no way to know when
SLOW_TRIPS = 3  # missed deadlines in a row that open the breaker


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
            return RateLimited(detail, [name], CONCURRENT_RETRY_AFTER)
        tight_verdict = max(denied, key=lambda v: v.retry_after)
        retry_after = max(1, math.ceil(tight_verdict.retry_after - 1e-6))
        tight = tight_verdict.policy
        key = (tight.name, tight.burst, tight.rate_text, tight.cost, retry_after,
               *[v.policy.name for v in denied])  # fmt: skip
        found = _DENIALS.get(key)
        if found is not None:
            return found  # never raised, only answered: one instance serves every repeat
        noun = "request" if tight.cost == 1 else f"request costing {tight.cost} tokens"
        detail = (
            f'rate limit "{tight.name}" exceeded: {tight.burst} tokens, refilled at '
            f"{tight.rate_text}; this {noun} can be retried in {retry_after} s"
        )
        denial = RateLimited(detail, [v.policy.name for v in denied], retry_after)
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


def _digest(text: str) -> str:
    """Identities in keys are hashed: fixed length, no key syntax, nothing readable in Redis."""
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def address_key(address: str) -> str:
    """The `[ip]` ceiling's identity: the address, or its /64 for IPv6 (one subscriber's
    allocation: rotating through it must not multiply the ceiling)."""
    if ":" not in address:
        return address
    try:
        return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
    except ValueError:
        return address


class Limiter:
    """Policies plus buckets plus the breaker. Knows Redis only through RedisBuckets."""

    def __init__(
        self,
        client: Any,
        policies: Policies,
        metrics: Metrics,
        *,
        prefix: str,
        timeout: float,
        divisor: int,
        lease_seconds: float = 30.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.metrics = metrics
        self.prefix = f"{prefix}rl:"
        self.buckets = RedisBuckets(
            client, timeout=timeout, on_round_trip=self._round_trip, on_error=self._failed
        )
        self.local = LocalBuckets(divisor) if clock is None else LocalBuckets(divisor, clock)
        self.leases = Leases(client, ttl=lease_seconds, timeout=timeout, divisor=divisor)
        self.healthy = True
        self._slow = 0  # deadlines missed in a row
        self.degraded_since: float | None = None
        self._probe: asyncio.Task[None] | None = None
        self._checks: set[asyncio.Task[None]] = set()  # check_soon's general case
        self._children: dict[tuple[str, str], Any] = {}
        self._takes: dict[tuple[str, str, str], Take] = {}
        self.policies = policies
        self._args: dict[str, tuple[str, str]] = {}
        self.use(policies)

    def use(self, policies: Policies) -> None:
        """Apply a new policy set (boot, SIGHUP): buckets of a kept name keep their state."""
        self._args = {p.name: (repr(p.interval_us), str(p.burst)) for p in policies.all()}
        self._takes = {}
        self.policies = policies
        for policy in policies.all():
            for decision in ("allowed", "limited"):
                self._count(policy.name, decision, 0)  # series exist from the start

    async def start(self) -> None:
        await self.buckets.start()
        await self.leases.start()

    async def close(self) -> None:
        await cancel(self._probe)
        for task in list(self._checks):
            await cancel(task)
        await self.buckets.close()
        await self.leases.close()

    def _count(self, policy: str, decision: str, amount: int = 1) -> None:
        child = self._children.get((policy, decision))
        if child is None:
            child = self._children[(policy, decision)] = self.metrics.ratelimit_decisions.labels(
                policy, decision
            )
        child.inc(amount)

    def _take(self, policy: Policy, kind: str, value: str) -> Take:
        """The bucket operation of (policy, identity), memoized: the key's hash is most of
        its cost, and the same users come back. Emptied when the policies change."""
        take = self._takes.get((policy.name, kind, value))
        if take is None:
            if kind == "address":
                digest = _digest(address_key(value))
            elif kind == "ip":  # an anonymous client: per /64 for IPv6, like the ceiling
                digest = _digest(f"ip:{address_key(value)}")
            else:
                digest = _digest(f"{kind}:{value}")
            interval, burst = self._args[policy.name]
            take = Take(f"{self.prefix}{policy.name}:{digest}", interval, burst, policy.cost)
            if len(self._takes) >= KEY_CACHE:
                self._takes.clear()  # cheaper than an LRU, and refilled in a few requests
            self._takes[(policy.name, kind, value)] = take
        return take

    def plan(
        self,
        method: str,
        path: str,
        identity: Identity,
        address: str,
        body_bytes: int | None = None,
    ) -> tuple[Policy, list[Policy], list[Take]]:
        """The policy of a request, and every bucket it takes from: its policy's, its token
        budget's (the reservation), the ceiling's. Buckets that cost nothing are left out."""
        policies = self.policies
        policy = policies.match(method, path)
        applied: list[Policy] = []
        takes: list[Take] = []
        if policy.cost:
            applied.append(policy)
            takes.append(self._take(policy, identity.kind, identity.value))
        budget = policy.tokens
        if budget is not None:
            applied.append(budget)
            reserve = policy.estimate(body_bytes)
            takes.append(self._take(budget, identity.kind, identity.value)._replace(cost=reserve))
        ceiling = policy.address
        if ceiling is not None and ceiling.cost:
            applied.append(ceiling)
            takes.append(self._take(ceiling, "address", address))
        ip = policies.ip
        if ip is not None and ip.cost:
            applied.append(ip)
            takes.append(self._take(ip, "address", address))
        return policy, applied, takes

    def plan_address(self, address: str) -> tuple[list[Policy], list[Take]]:
        """Only the `[ip]` ceiling: what a request refused for its identity still takes."""
        ip = self.policies.ip
        if ip is None or not ip.cost:
            return [], []
        return [ip], [self._take(ip, "address", address)]

    async def check(
        self,
        method: str,
        path: str,
        identity: Identity,
        address: str,
        body_bytes: int | None = None,
    ) -> Decision | None:
        """The decision for one request (None when no policy costs anything). Raises
        LimiterUnavailable when Redis is unavailable and a policy fails closed."""
        policy, policies, takes = self.plan(method, path, identity, address, body_bytes)
        if not takes and policy.concurrent is None:
            return None
        decision = await self._buckets(policies, takes)
        if decision.allowed and policy.tokens is not None and not decision.degraded:
            take = next(t for t, p in zip(takes, policies, strict=True) if p is policy.tokens)
            decision.reservation = (policy.tokens, take)
            self._tokens(policy.tokens.name, "reserved", take.cost)
        if decision.allowed and policy.concurrent is not None:
            await self._lease(policy, identity, decision, takes)
        return decision

    def check_soon(
        self,
        method: str,
        path: str,
        identity: Identity,
        address: str,
        body_bytes: int | None,
        done: Decided,
    ) -> None:
        """`check()` for a caller with no task of its own (the data plane): `done(decision,
        None)` or `done(None, error)` is called once, maybe before this returns. The common
        case (buckets only) costs a callback, not a task."""
        policy, policies, takes = self.plan(method, path, identity, address, body_bytes)
        if not takes and policy.concurrent is None:
            done(None, None)
        elif policy.tokens is None and policy.concurrent is None:
            self._decide_soon(policies, takes, done)
        else:  # budgets and caps: the general path, on a task

            async def general() -> None:
                try:
                    decision = await self.check(method, path, identity, address, body_bytes)
                except GatewayError as exc:
                    done(None, exc)
                else:
                    done(decision, None)

            task = asyncio.get_running_loop().create_task(general())
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)

    def check_address_soon(self, address: str, done: Decided) -> None:
        """A request refused for its identity (400, 401) still takes from its address's
        `[ip]` bucket, so a flood of bad tokens or ids meets 429s like any other flood."""
        policies, takes = self.plan_address(address)
        if not takes:
            done(None, None)
        else:
            self._decide_soon(policies, takes, done)

    def _decide_soon(self, policies: list[Policy], takes: list[Take], done: Decided) -> None:
        if not self.healthy:
            try:
                decision = self._degraded(takes, policies)
            except LimiterUnavailable as exc:
                done(None, exc)
                return
            done(decision, None)
            return

        def replied(flat: Sequence[int] | None, exc: BaseException | None) -> None:
            try:
                if flat is not None:
                    decision = self._verdicts(policies, takes, flat)
                else:  # decided without Redis (see _buckets)
                    decision = self._degraded(takes, policies, transient=self.healthy)
            except LimiterUnavailable as error:
                done(None, error)
                return
            done(decision, None)

        self.buckets.take_then(takes, replied)

    async def _buckets(self, policies: list[Policy], takes: list[Take]) -> Decision:
        if not takes:
            return Decision((), True)
        if self.healthy:
            try:
                flat = await self.buckets.take_flat(takes)
            except BucketsUnavailable:
                # Decided without Redis. While the breaker stays closed (one missed deadline:
                # Redis may be fine and this process late) every policy uses the local bucket,
                # metered: failing a `closed` policy over one slow round trip would turn
                # away requests that Redis would have admitted.
                return self._degraded(takes, policies, transient=self.healthy)
            return self._verdicts(policies, takes, flat)
        return self._degraded(takes, policies)

    def _verdicts(self, policies: list[Policy], takes: list[Take], flat: Sequence[int]) -> Decision:
        """The decision the script's replies make (five integers per bucket), counted."""
        verdicts = tuple(
            [
                Verdict(
                    p,
                    flat[i] == 1,
                    flat[i + 1],
                    flat[i + 2] / 1e6,
                    flat[i + 3] / 1e6,
                    flat[i + 4] / 1e6,
                )
                for p, i in zip(policies, range(0, 5 * len(policies), 5), strict=True)
            ]
        )
        allowed = True
        for verdict in verdicts:
            if verdict.allowed:
                self._count(verdict.policy.name, "allowed")
            else:
                allowed = False
                self._count(verdict.policy.name, "limited")
        if allowed or len(verdicts) == 1:
            return Decision(verdicts, allowed)
        if self.buckets.atomic:  # nothing was taken from any bucket
            return Decision(verdicts, False)
        # Cluster: the buckets that had room did pay; pay them back
        self._pay_back(t for t, v in zip(takes, verdicts, strict=True) if v.allowed)
        return Decision(refunded(verdicts, takes), False)

    async def _lease(
        self, policy: Policy, identity: Identity, decision: Decision, takes: list[Take]
    ) -> None:
        """Hold one of the policy's `concurrent` slots for this request, or deny it (and
        give back what its buckets took)."""
        cap = policy.concurrent
        assert cap is not None
        name = policy.concurrent_name
        key = f"{self.prefix}cc:{policy.name}:{_digest(f'{identity.kind}:{identity.value}')}"
        mode = policy.failure_mode
        try:
            if not self.healthy:
                raise LeasesUnavailable("the limiter's breaker is open")
            lease, held = await self.leases.acquire(key, cap)
        except LeasesUnavailable:
            if mode == "closed":
                self._count(name, "closed_rejected")
                self._give_back(decision, takes)
                raise LimiterUnavailable(
                    f'the concurrency cap "{name}" cannot be checked and fails closed; '
                    "retry shortly",
                    CLOSED_RETRY_AFTER,
                ) from None
            if mode == "open":
                self._count(name, "open_allowed")
                return
            lease, held = self.leases.acquire_local(key, cap)
            self._count(name, "fallback_allowed" if lease else "fallback_limited")
        else:
            self._count(name, "allowed" if lease else "limited")
        self.metrics.ratelimit_streams.set(self.leases.held)
        decision.concurrency = (policy, max(0, cap - held))
        if lease is None:
            self._give_back(decision, takes)
            decision.allowed = False
            return
        decision.lease = lease

    def _give_back(self, decision: Decision, takes: list[Take]) -> None:
        """A request denied after its buckets paid (the concurrency cap) gets it all back."""
        decision.reservation = None
        if not decision.degraded:
            self._pay_back(takes)

    def finish(self, decision: Decision, used: int | None, *, refund: bool) -> None:
        """After the response: release the lease and settle the token reservation. `refund`:
        the model never answered (upstream failure, error status, client gone before the first
        byte), so the whole reservation comes back; else `used` tokens are settled against it
        (more is debited, into debt if need be; less is refunded), and with no usage reported
        the reservation stands."""
        if decision.lease is not None:
            lease, decision.lease = decision.lease, None
            task = asyncio.get_running_loop().create_task(self.leases.release(lease))
            task.add_done_callback(lambda t: self.metrics.ratelimit_streams.set(self.leases.held))
        if decision.reservation is None:
            return
        budget, take = decision.reservation
        decision.reservation = None
        reserved = take.cost
        if refund:
            delta, kind = -reserved, "refunded"
        elif used is None:
            self._tokens(budget.name, "unsettled", reserved)
            return
        else:
            delta = used - reserved
            kind = "debited" if delta > 0 else "refunded"
        if delta == 0:
            return
        self._tokens(budget.name, kind, abs(delta))
        future = self.buckets.take([take._replace(cost=delta, force=1 if delta > 0 else 0)])
        future.add_done_callback(self._settled)

    def _settled(self, future: asyncio.Future[list[Reply]]) -> None:
        if future.cancelled() or future.exception() is not None:
            self.metrics.ratelimit_settlement_errors.inc()

    def _tokens(self, budget: str, kind: str, amount: int) -> None:
        self.metrics.ratelimit_tokens.labels(budget, kind).inc(amount)

    def _pay_back(self, takes: Iterable[Take]) -> None:
        """Give back what these bucket operations took (a denied request keeps no tokens);
        fire and forget: a lost refund only errs on the strict side."""
        refunds = [take._replace(cost=-take.cost) for take in takes if take.cost > 0]
        if refunds:
            future = self.buckets.take(refunds)
            future.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _degraded(
        self, takes: list[Take], policies: list[Policy], *, transient: bool = False
    ) -> Decision:
        verdicts: list[Verdict] = []
        closed: Policy | None = None
        for take, policy in zip(takes, policies, strict=True):
            mode = "local" if transient else policy.failure_mode
            if mode == "closed":
                closed = policy
                self._count(policy.name, "closed_rejected")
            elif mode == "open":
                verdicts.append(Verdict(policy, True, 0, 0.0, 0.0, 0.0, known=False))
                self._count(policy.name, "open_allowed")
            else:
                reply = self.local.take(take.key, 1 / policy.rate, policy.burst, policy.cost)
                verdicts.append(Verdict(policy, *reply))
                self._count(
                    policy.name, "fallback_allowed" if reply.allowed else "fallback_limited"
                )
        if closed is not None:
            raise LimiterUnavailable(
                f'rate limiting is unavailable and policy "{closed.name}" does not serve '
                "without it (failure_mode closed); retry shortly",
                CLOSED_RETRY_AFTER,
            )
        decision = Decision(tuple(verdicts), all(v.allowed for v in verdicts), degraded=True)
        if not decision.allowed:
            for take, verdict in zip(takes, verdicts, strict=True):
                if verdict.allowed and verdict.known:
                    policy = verdict.policy
                    self.local.take(take.key, 1 / policy.rate, policy.burst, -take.cost)
            decision = Decision(refunded(decision.verdicts, takes), False, degraded=True)
        return decision

    # --- the breaker ---------------------------------------------------------------------

    def _round_trip(self, seconds: float, skew: float) -> None:
        self._slow = 0
        self.metrics.ratelimit_redis_duration.observe(seconds)
        self.metrics.ratelimit_clock_skew.set(skew)

    def _failed(self, exc: BucketsUnavailable) -> None:
        """A round trip failed: its requests are decided without Redis. The breaker opens at
        once on an error, but only after SLOW_TRIPS deadlines missed in a row: a process whose
        CPU is saturated can itself be late reading a reply Redis sent in time."""
        self.metrics.ratelimit_backend_errors.inc()
        if not self.healthy:
            return
        if exc.slow:
            self._slow += 1
            if self._slow < SLOW_TRIPS:
                return
        self.healthy = False
        loop = asyncio.get_running_loop()
        self.degraded_since = loop.time()
        self.metrics.ratelimit_fallback.set(1)
        logger.warning(
            "rate limiter: Redis unavailable (%s); policies follow their failure_mode until it "
            "answers again",
            exc,
        )
        self._probe = loop.create_task(self._recover())

    async def _recover(self) -> None:
        """Probe Redis with backoff until the script runs again, then close the breaker."""
        retrying = AsyncRetrying(
            wait=wait_exponential(multiplier=PROBE_WAIT_INITIAL, max=PROBE_WAIT_MAX)
            + wait_random(0, PROBE_WAIT_INITIAL),
            retry=retry_if_exception_type(BucketsUnavailable),
        )
        probe = Take(f"{self.prefix}probe", "1000000", "1", 0)
        async for attempt in retrying:
            with attempt:
                await self.buckets.take([probe])  # a failure is counted by _failed()
        self.healthy = True
        self.metrics.ratelimit_fallback.set(0)
        since = self.degraded_since or 0.0
        logger.warning(
            "rate limiter: Redis answers again after %.1f s; limits are shared again",
            asyncio.get_running_loop().time() - since,
        )
        self._probe = None
