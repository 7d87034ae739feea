"""The rate limiter: which policies apply to a request (planning), asked of Redis, decided.

Each proxied request is checked against its policy (the first matching rule, else the default),
keyed on its identity, and against the `[ip]` ceiling, keyed on its client address; both in one
round trip. Denied if either bucket is short; a bucket that did take tokens for a denied request
gets them back, so a user over their limit does not drain the shared address's ceiling and the
reverse.

Without Redis (the breaker open, or one round trip lost) each policy follows its `failure_mode`
(`local`: an in-process bucket at a fraction of the rate; `open`: allow; `closed`: 503). The
parts: `decisions` (what is answered), `breaker` (whether Redis is asked), `settlement` (what
happens after the response), `buckets` and `leases` (the Redis side).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from collections.abc import Callable, Sequence
from typing import Any

from gateway.auth.identity import Identity
from gateway.errors import GatewayError, LimiterUnavailable
from gateway.limiting.breaker import Breaker
from gateway.limiting.buckets import BucketsUnavailable, LocalBuckets, RedisBuckets, Take
from gateway.limiting.decisions import Decided, Decision, Verdict, refunded
from gateway.limiting.leases import Leases, LeasesUnavailable
from gateway.limiting.overrides import Overrides, user_of
from gateway.limiting.policies import DEFAULT_PLAN, Policies, Policy
from gateway.limiting.settlement import Settlement
from gateway.metrics import Metrics
from pixelcraft.aio import Tasks

logger = logging.getLogger(__name__)

KEY_CACHE = 50_000  # memoized bucket operations (about 300 bytes each)
CLOSED_RETRY_AFTER = 2  # seconds a failure_mode=closed 503 asks the client to wait


def _digest(text: str) -> str:
    """Identities in keys are hashed: fixed length, no key syntax, nothing readable in Redis."""
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def identity_digest(kind: str, value: str) -> str:
    """An identity as its buckets' keys name it: anonymous clients and address ceilings by
    address (per /64 for IPv6), users by kind and id."""
    if kind == "address":
        return _digest(address_key(value))
    if kind == "ip":
        return _digest(f"ip:{address_key(value)}")
    return _digest(f"{kind}:{value}")


def bucket_key(prefix: str, bucket: str, kind: str, value: str) -> str:
    """The Redis key of one identity's bucket (`prefix` ends in `rl:`)."""
    return f"{prefix}{bucket}:{identity_digest(kind, value)}"


def lease_key(prefix: str, policy: str, kind: str, value: str) -> str:
    """The Redis key of one identity's concurrency leases under `policy`."""
    return f"{prefix}cc:{policy}:{_digest(f'{kind}:{value}')}"


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
    """Policies plus buckets plus the breaker. Knows Redis only through RedisBuckets and
    Leases."""

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
        self.breaker = Breaker(metrics, self._probe)
        self.buckets = RedisBuckets(
            client,
            timeout=timeout,
            on_round_trip=self.breaker.round_trip,
            on_error=self.breaker.failed,
        )
        self.local = LocalBuckets(divisor) if clock is None else LocalBuckets(divisor, clock)
        self.leases = Leases(client, ttl=lease_seconds, timeout=timeout, divisor=divisor)
        self.settlement = Settlement(self.buckets, self.leases, metrics)
        self._checks = Tasks("limiter checks")  # check_soon's general case
        self._children: dict[tuple[str, str, str], Any] = {}
        self._takes: dict[tuple[str, str, str], Take] = {}
        self.overrides: Overrides | None = None  # per-user overrides, when the app has them
        self._unknown_plans: set[str] = set()
        self.policies = policies
        self.use(policies)

    def use(self, policies: Policies) -> None:
        """Apply a new policy set (boot, SIGHUP): buckets of a kept name keep their state."""
        self._takes = {}
        self.policies = policies
        for policy in policies.all():
            for decision in ("allowed", "limited"):
                self._count(policy.name, policy.plan, decision, 0)  # series exist from the start

    async def start(self) -> None:
        await self.buckets.start()
        await self.leases.start()

    @property
    def healthy(self) -> bool:
        """Whether Redis is asked (the breaker closed)."""
        return self.breaker.healthy

    async def close(self) -> None:
        await self.breaker.close()
        await self._checks.close()
        await self.settlement.close()
        await self.buckets.close()
        await self.leases.close()

    def _count(self, policy: str, plan: str, decision: str, amount: int = 1) -> None:
        key = (policy, plan, decision)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.metrics.ratelimit_decisions.labels(
                policy, decision, plan
            )
        child.inc(amount)

    def _take(self, policy: Policy, kind: str, value: str) -> Take:
        """The bucket operation of (policy, identity), memoized: the key's hash is most of
        its cost, and the same users come back. Emptied when the policies change. (An
        overridden policy shares its plan's bucket with other parameters: never memoized.)"""
        take = self._takes.get((policy.bucket, kind, value))
        if take is None:
            interval, burst = policy.args
            take = Take(bucket_key(self.prefix, policy.bucket, kind, value), interval, burst,
                        policy.cost)  # fmt: skip
            if policy.override:
                return take
            if len(self._takes) >= KEY_CACHE:
                self._takes.clear()  # cheaper than an LRU, and refilled in a few requests
            self._takes[(policy.bucket, kind, value)] = take
        return take

    def plan_of(self, identity: Identity) -> str:
        """The plan whose policies apply to this identity (an unconfigured one: the default)."""
        plan = identity.plan
        return plan if plan == DEFAULT_PLAN or plan in self.policies.plans else DEFAULT_PLAN

    def effective(self, policy: Policy, identity: Identity) -> Policy:
        """`policy` as it applies to this identity: its plan's version, then any override."""
        plan = identity.plan
        if plan != DEFAULT_PLAN:
            planned = self.policies.for_plan(policy, plan)
            if planned is not None:
                policy = planned
            elif plan not in self._unknown_plans and len(self._unknown_plans) < 1000:
                self._unknown_plans.add(plan)
                logger.warning(
                    "plan %r is not in the policy file: its users get the default plan",
                    plan[:64],
                )
        overrides = self.overrides
        if overrides is not None and overrides.entries:
            policy = overrides.apply(policy, user_of(identity))
        return policy

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
        overrides = self.overrides
        if identity.plan != DEFAULT_PLAN or (overrides is not None and overrides.entries):
            policy = self.effective(policy, identity)
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
            self.settlement.count_tokens(policy.tokens.name, "reserved", take.cost)
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

            self._checks.spawn(general())

    def check_address_soon(self, address: str, done: Decided) -> None:
        """A request refused for its identity (400, 401) still takes from its address's
        `[ip]` bucket, so a flood of bad tokens or ids meets 429s like any other flood."""
        policies, takes = self.plan_address(address)
        if not takes:
            done(None, None)
        else:
            self._decide_soon(policies, takes, done)

    def _decide_soon(self, policies: list[Policy], takes: list[Take], done: Decided) -> None:
        if not self.breaker.healthy:
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
                self._count(verdict.policy.name, verdict.policy.plan, "allowed")
            else:
                allowed = False
                self._count(verdict.policy.name, verdict.policy.plan, "limited")
        if allowed or len(verdicts) == 1:
            return Decision(verdicts, allowed)
        if self.buckets.atomic:  # nothing was taken from any bucket
            return Decision(verdicts, False)
        # Cluster: the buckets that had room did pay; pay them back
        self.settlement.pay_back(t for t, v in zip(takes, verdicts, strict=True) if v.allowed)
        return Decision(refunded(verdicts, takes), False)

    async def _lease(
        self, policy: Policy, identity: Identity, decision: Decision, takes: list[Take]
    ) -> None:
        """Hold one of the policy's `concurrent` slots for this request, or deny it (and
        give back what its buckets took)."""
        cap = policy.concurrent
        assert cap is not None
        name = policy.concurrent_name
        key = lease_key(self.prefix, policy.name, identity.kind, identity.value)
        mode = policy.failure_mode
        try:
            if not self.healthy:
                raise LeasesUnavailable("the limiter's breaker is open")
            lease, held = await self.leases.acquire(key, cap)
        except LeasesUnavailable:
            if mode == "closed":
                self._count(name, policy.plan, "closed_rejected")
                self._give_back(decision, takes)
                raise LimiterUnavailable(
                    f'the concurrency cap "{name}" cannot be checked and fails closed; '
                    "retry shortly",
                    CLOSED_RETRY_AFTER,
                ) from None
            if mode == "open":
                self._count(name, policy.plan, "open_allowed")
                return
            lease, held = self.leases.acquire_local(key, cap)
            self._count(name, policy.plan, "fallback_allowed" if lease else "fallback_limited")
        else:
            self._count(name, policy.plan, "allowed" if lease else "limited")
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
            self.settlement.pay_back(takes)

    def finish(self, decision: Decision, used: int | None, *, refund: bool) -> None:
        """After the response: see Settlement.finish."""
        self.settlement.finish(decision, used, refund=refund)

    def _degraded(
        self, takes: list[Take], policies: list[Policy], *, transient: bool = False
    ) -> Decision:
        verdicts: list[Verdict] = []
        closed: Policy | None = None
        for take, policy in zip(takes, policies, strict=True):
            mode = "local" if transient else policy.failure_mode
            if mode == "closed":
                closed = policy
                self._count(policy.name, policy.plan, "closed_rejected")
            elif mode == "open":
                verdicts.append(Verdict(policy, True, 0, 0.0, 0.0, 0.0, known=False))
                self._count(policy.name, policy.plan, "open_allowed")
            else:
                reply = self.local.take(take.key, 1 / policy.rate, policy.burst, policy.cost)
                verdicts.append(Verdict(policy, *reply))
                self._count(
                    policy.name,
                    policy.plan,
                    "fallback_allowed" if reply.allowed else "fallback_limited",
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

    async def _probe(self) -> None:
        """The breaker's probe: one bucket round trip that takes nothing."""
        await self.buckets.take([Take(f"{self.prefix}probe", "1000000", "1", 0)])
