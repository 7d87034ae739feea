"""Token buckets: in Redis (the real, shared ones) and in process (the fallback). No HTTP here.

RedisBuckets runs `lua/token_bucket.lua` by EVALSHA (loaded once; NOSCRIPT, after a Redis
restart or on a new Cluster node, loads it again and retries). The checks of every request that
arrives in the same event-loop turn go out as one pipeline: one round trip for all of them,
which is what keeps the limiter's cost per request small under load. Every round trip has a
deadline; a failure of any kind is one BucketsUnavailable for the whole batch.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, NamedTuple

from redis.asyncio import RedisCluster
from redis.exceptions import NoScriptError, RedisError, ResponseError

logger = logging.getLogger(__name__)


def script_source() -> str:
    return resources.files("gateway").joinpath("lua/token_bucket.lua").read_text("utf-8")


class BucketsUnavailable(Exception):
    """Redis did not run the bucket script in time (down, stalled, refusing, erroring)."""


class Take(NamedTuple):
    """One bucket operation: take `cost` tokens (negative: give back) from the bucket `key`."""

    key: str
    interval_us: str  # pre-rendered script arguments: no per-request encoding work
    burst: str
    cost: int


class Reply(NamedTuple):
    """The script's answer, times in seconds."""

    allowed: bool
    remaining: int
    retry_after: float  # until `cost` tokens are there (0 when allowed)
    next_token: float  # until at least one token is there
    reset: float  # until the bucket is full


def _reply(raw: Sequence[int]) -> Reply:
    return Reply(bool(raw[0]), raw[1], raw[2] / 1e6, raw[3] / 1e6, raw[4] / 1e6)


Batch = list[tuple[Sequence[Take], "asyncio.Future[list[Reply]]"]]


class RedisBuckets:
    """Coalesces bucket operations into pipelined EVALSHA round trips with a deadline.

    `on_round_trip(seconds, skew)` is told each successful round trip's latency and Redis's
    clock minus ours; `on_error(exc)` each failed one.
    """

    def __init__(
        self,
        client: Any,  # redis.asyncio.Redis or RedisCluster: both pipeline and EVALSHA
        *,
        timeout: float,
        on_round_trip: Callable[[float, float], None],
        on_error: Callable[[BucketsUnavailable], None],
    ) -> None:
        self.client = client
        self.timeout = timeout
        self.source = script_source()
        self.sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()
        self._cluster = isinstance(client, RedisCluster)
        self._head = b"*7\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$1\r\n1\r\n" % self.sha.encode()
        self._tails: dict[tuple[str, str, int], bytes] = {}
        self._on_round_trip = on_round_trip
        self._on_error = on_error
        self._pending: Batch = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def load(self) -> None:
        """Register the script (every primary, on a Cluster); RedisError if Redis refuses it."""
        await self.client.script_load(self.source)

    def take(self, takes: Sequence[Take]) -> asyncio.Future[list[Reply]]:
        """Queue `takes` for the next round trip; the future gets one Reply each, in order."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Reply]] = loop.create_future()
        self._pending.append((takes, future))
        if not self._scheduled:
            # call_soon runs after the handlers already made ready in this loop turn, so
            # every request that arrived together joins the same pipeline.
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: Batch) -> None:
        takes = [take for takes, _ in batch for take in takes]
        try:
            raw = await self.execute(takes)
        except BucketsUnavailable as exc:
            self._on_error(exc)
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        start = 0
        for takes_, future in batch:
            end = start + len(takes_)
            if not future.done():  # its request may have been cancelled meanwhile
                future.set_result([_reply(r) for r in raw[start:end]])
            start = end

    async def execute(self, takes: Sequence[Take]) -> list[Sequence[int]]:
        """One pipelined round trip (two if the script must be loaded first), with the
        deadline; the raw script replies in order."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                replies = await self._pipeline(takes)
                missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
                if missing:
                    await self.load()
                    again = await self._pipeline([takes[i] for i in missing])
                    for i, reply in zip(missing, again, strict=True):
                        replies[i] = reply
        except TimeoutError:
            raise BucketsUnavailable(f"no answer within {self.timeout * 1000:g} ms") from None
        except (RedisError, OSError) as exc:
            raise BucketsUnavailable(f"{type(exc).__name__}: {exc}") from exc
        for reply in replies:
            if isinstance(reply, Exception):  # the script refused or failed: not a verdict
                raise BucketsUnavailable(f"script error: {reply}") from reply
        elapsed = time.perf_counter() - started
        seconds, micros = replies[0][5], replies[0][6]
        # Redis's clock at the middle of the round trip, against ours.
        self._on_round_trip(elapsed, seconds + micros / 1e6 - (time.time() - elapsed / 2))
        return replies

    async def _pipeline(self, takes: Sequence[Take]) -> list[Any]:
        if self._cluster:
            return await self._cluster_pipeline(takes)
        # One connection from redis-py's pool (it did the connecting: TLS, unix socket, AUTH,
        # Sentinel discovery), the batch written in one send, the replies read in order.
        # redis-py's own pipeline packs each argument through its encoder and wraps every
        # reply in a timeout: most of the limiter's CPU, for nothing the deadline does not
        # already cover.
        pool = self.client.connection_pool
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(
                b"".join([self._packed(take) for take in takes]), check_health=False
            )
            replies: list[Any] = []
            for _ in takes:
                try:
                    # inf: no per-reply timer; execute()'s deadline bounds the whole batch,
                    # and on cancellation redis-py drops the connection (replies pending).
                    replies.append(await conn.read_response(timeout=math.inf))
                except ResponseError as exc:  # this reply only; the stream stays in step
                    replies.append(exc)
            return replies
        finally:
            await pool.release(conn)

    def _packed(self, take: Take) -> bytes:
        """EVALSHA <sha> 1 <key> <interval> <burst> <cost> in RESP, the constant parts cached."""
        tail = self._tails.get((take.interval_us, take.burst, take.cost))
        if tail is None:
            args = (take.interval_us, take.burst, str(take.cost))
            tail = "".join(f"${len(a)}\r\n{a}\r\n" for a in args).encode()
            if len(self._tails) < 1024:
                self._tails[(take.interval_us, take.burst, take.cost)] = tail
        key = take.key.encode()
        return b"%s$%d\r\n%s\r\n%s" % (self._head, len(key), key, tail)

    async def _cluster_pipeline(self, takes: Sequence[Take]) -> list[Any]:
        """redis-py's Cluster pipeline: it routes each key to its node."""
        pipe = self.client.pipeline(transaction=False)
        sha = self.sha
        for take in takes:
            # execute_command: the Cluster pipeline blocks its evalsha() helper, the raw
            # command is routed by its key like any other.
            pipe.execute_command("EVALSHA", sha, 1, take.key, take.interval_us, take.burst,
                                 take.cost)  # fmt: skip
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    async def close(self) -> None:
        """Wait for round trips in flight (each is bounded by the deadline)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class LocalBuckets:
    """The fallback while Redis is unavailable: the same algorithm in this process, each
    bucket at 1/`divisor` of the policy (divisor = the gateway processes sharing the limits,
    so together they stay near the real limit). Bounded: least recently used keys go first."""

    def __init__(
        self,
        divisor: int,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        self.divisor = divisor
        self.clock = clock
        self.max_keys = max_keys
        self._tat: dict[str, float] = {}

    def take(self, key: str, interval: float, burst: int, cost: int) -> Reply:
        """Take `cost` tokens (negative: give back). `interval` is seconds per token."""
        now = self.clock()
        interval *= self.divisor
        capacity = max(float(cost), burst / self.divisor) * interval
        tat = max(self._tat.pop(key, now), now)
        new_tat = tat + cost * interval
        allowed, wait = True, 0.0
        if cost > 0 and new_tat - now > capacity + 1e-9:
            allowed, wait, new_tat = False, new_tat - now - capacity, tat
        new_tat = max(new_tat, now)
        if new_tat > now:
            self._tat[key] = new_tat
            if len(self._tat) > self.max_keys:
                del self._tat[next(iter(self._tat))]
        used = new_tat - now
        remaining = math.floor((capacity - used) / interval + 1e-9)
        next_token = used - capacity + interval if remaining < 1 else 0.0
        return Reply(allowed, remaining, wait, next_token, used)

    def __len__(self) -> int:
        return len(self._tat)
