"""The limiter's circuit breaker: whether requests still wait on Redis at all.

When a round trip fails (down, stalled past the deadline, refusing the script) the breaker
opens: requests stop waiting on Redis and each policy follows its `failure_mode`, while a
background probe retries with exponential backoff and closes the breaker when Redis answers.
An error opens it at once; missed deadlines only after SLOW_TRIPS in a row, since a process
whose CPU is saturated can itself be late reading a reply Redis sent in time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential, wait_random

from gateway.limiting.buckets import BucketsUnavailable
from gateway.metrics import Metrics
from pixelcraft.aio import cancel

logger = logging.getLogger(__name__)

# The probe: first retry after ~50 ms, then doubling (with jitter) up to 2 s, so a Redis that
# comes back is noticed within a couple of seconds and a dead one costs ~1 probe/2 s.
PROBE_WAIT_INITIAL = 0.05
PROBE_WAIT_MAX = 2.0
SLOW_TRIPS = 3  # missed deadlines in a row that open the breaker


class Breaker:
    """`healthy` while closed. Told of every round trip (`round_trip`, `failed`: the buckets'
    callbacks); `probe` is one round trip that raises BucketsUnavailable while Redis is out."""

    def __init__(self, metrics: Metrics, probe: Callable[[], Awaitable[object]]) -> None:
        self.metrics = metrics
        self.healthy = True
        self.degraded_since: float | None = None
        self._probe = probe
        self._slow = 0  # deadlines missed in a row
        self._recovering: asyncio.Task[None] | None = None

    async def close(self) -> None:
        await cancel(self._recovering)

    def round_trip(self, seconds: float, skew: float) -> None:
        self._slow = 0
        self.metrics.ratelimit_redis_duration.observe(seconds)
        self.metrics.ratelimit_clock_skew.set(skew)

    def failed(self, exc: BucketsUnavailable) -> None:
        """A round trip failed: its requests are decided without Redis (by the limiter)."""
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
        self._recovering = loop.create_task(self._recover())

    async def _recover(self) -> None:
        """Probe Redis with backoff until the script runs again, then close the breaker."""
        retrying = AsyncRetrying(
            wait=wait_exponential(multiplier=PROBE_WAIT_INITIAL, max=PROBE_WAIT_MAX)
            + wait_random(0, PROBE_WAIT_INITIAL),
            retry=retry_if_exception_type(BucketsUnavailable),
        )
        async for attempt in retrying:
            with attempt:
                await self._probe()  # a failure is counted by failed()
        self.healthy = True
        self.metrics.ratelimit_fallback.set(0)
        since = self.degraded_since or 0.0
        logger.warning(
            "rate limiter: Redis answers again after %.1f s; limits are shared again",
            asyncio.get_running_loop().time() - since,
        )
        self._recovering = None
