"""The limiter's breaker: when it opens, and that its probe closes it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.limiting.breaker import SLOW_TRIPS, Breaker
from gateway.limiting.buckets import BucketsUnavailable
from gateway.metrics import Metrics
from tests.conftest import wait_until


class Probe:
    """Redis as the probe sees it: out until `back` is set."""

    def __init__(self) -> None:
        self.back = asyncio.Event()
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        if not self.back.is_set():
            raise BucketsUnavailable("still down")


@pytest.fixture
async def breaker() -> AsyncIterator[tuple[Breaker, Probe]]:
    probe = Probe()
    made = Breaker(Metrics(), probe)
    yield made, probe
    await made.close()


def fallback(breaker: Breaker) -> float | None:
    return breaker.metrics.registry.get_sample_value("gateway_ratelimit_fallback_active")


async def test_an_error_opens_it_at_once(breaker: tuple[Breaker, Probe]) -> None:
    b, _ = breaker
    assert b.healthy and fallback(b) == 0
    b.failed(BucketsUnavailable("connection refused"))
    assert not b.healthy and fallback(b) == 1 and b.degraded_since is not None


async def test_missed_deadlines_open_it_only_after_slow_trips_in_a_row(
    breaker: tuple[Breaker, Probe],
) -> None:
    b, _ = breaker
    for _ in range(SLOW_TRIPS - 1):
        b.failed(BucketsUnavailable("late", slow=True))
    assert b.healthy
    b.round_trip(0.001, 0.0)  # one on time: the count starts again
    for _ in range(SLOW_TRIPS - 1):
        b.failed(BucketsUnavailable("late", slow=True))
    assert b.healthy
    b.failed(BucketsUnavailable("late", slow=True))
    assert not b.healthy


async def test_the_probe_closes_it_once_redis_answers(breaker: tuple[Breaker, Probe]) -> None:
    b, probe = breaker
    b.failed(BucketsUnavailable("down"))
    await wait_until(lambda: probe.calls >= 2, within=5)  # retried while Redis is out
    assert not b.healthy
    probe.back.set()
    await wait_until(lambda: b.healthy, within=5)
    assert fallback(b) == 0
    errors = b.metrics.registry.get_sample_value("gateway_ratelimit_backend_errors_total")
    assert errors == 1
    b.failed(BucketsUnavailable("down again"))  # and it opens again
    assert not b.healthy
