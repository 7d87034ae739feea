"""After the response: a request's lease released and its token reservation settled; and the
refunds of denied requests. All fire and forget: a lost refund only errs on the strict side."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from gateway.limiting.buckets import RedisBuckets, Reply, Take
from gateway.limiting.decisions import Decision
from gateway.limiting.leases import Leases
from gateway.metrics import Metrics
from pixelcraft.aio import Tasks


class Settlement:
    def __init__(self, buckets: RedisBuckets, leases: Leases, metrics: Metrics) -> None:
        self.buckets = buckets
        self.leases = leases
        self.metrics = metrics
        self.tasks = Tasks("lease releases")

    async def close(self) -> None:
        await self.tasks.close()

    def finish(self, decision: Decision, used: int | None, *, refund: bool) -> None:
        """Release the lease and settle the token reservation. `refund`: the model never
        answered (upstream failure, error status, client gone before the first byte), so the
        whole reservation comes back; else `used` tokens are settled against it (more is
        debited, into debt if need be; less is refunded), and with no usage reported the
        reservation stands."""
        if decision.lease is not None:
            lease, decision.lease = decision.lease, None
            task = self.tasks.spawn(self.leases.release(lease))
            task.add_done_callback(lambda t: self.metrics.ratelimit_streams.set(self.leases.held))
        if decision.reservation is None:
            return
        budget, take = decision.reservation
        decision.reservation = None
        reserved = take.cost
        if refund:
            delta, kind = -reserved, "refunded"
        elif used is None:
            self.count_tokens(budget.name, "unsettled", reserved)
            return
        else:
            delta = used - reserved
            kind = "debited" if delta > 0 else "refunded"
        if delta == 0:
            return
        self.count_tokens(budget.name, kind, abs(delta))
        future = self.buckets.take([take._replace(cost=delta, force=1 if delta > 0 else 0)])
        future.add_done_callback(self._settled)

    def _settled(self, future: asyncio.Future[list[Reply]]) -> None:
        if future.cancelled() or future.exception() is not None:
            self.metrics.ratelimit_settlement_errors.inc()

    def count_tokens(self, budget: str, kind: str, amount: int) -> None:
        self.metrics.ratelimit_tokens.labels(budget, kind).inc(amount)

    def pay_back(self, takes: Iterable[Take]) -> None:
        """Give back what these bucket operations took (a denied request keeps no tokens)."""
        refunds = [take._replace(cost=-take.cost) for take in takes if take.cost > 0]
        if refunds:
            future = self.buckets.take(refunds)
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
