"""Token buckets: in Redis (the real, shared ones) and in process (the fallback). No HTTP here.

RedisBuckets runs `lua/token_bucket.lua` by EVALSHA (loaded once; NOSCRIPT, after a Redis
restart or on a new Cluster node, loads it again and retries). One script call per request
takes from all of its buckets at once, all or nothing. Calls are coalesced: whatever requests
queued while the previous round trip was out go as one pipelined write on a connection of the
limiter's own (`resp`: hiredis parses the replies in the protocol, no await per reply),
and each request's callback gets its replies. One batch is out at a time, and each has a
deadline (a timer, armed when the batch starts, connecting included): whatever happens, every
request is answered within it. Any failure of any kind (down, stalled, refusing, a bug of ours)
is one BucketsUnavailable for the whole batch; the next batch starts afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

from redis.asyncio import RedisCluster
from redis.exceptions import NoScriptError

from gateway.limiting.resp import RespWire, pack, release, take_over
from gateway.limiting.scripts import LuaScript
from pixelcraft.aio import cancel

logger = logging.getLogger(__name__)

T = TypeVar("T")


class BucketsUnavailable(Exception):
    """Redis did not run the bucket script in time (down, stalled, refusing, erroring).
    `slow` when it only missed the deadline (it may be this process that is late)."""

    def __init__(self, message: str, *, slow: bool = False) -> None:
        super().__init__(message)
        self.slow = slow


class Take(NamedTuple):
    """One bucket operation: take `cost` tokens (negative: give back) from the bucket `key`."""

    key: str
    interval_us: str  # pre-rendered script arguments: no per-request encoding work
    burst: str
    cost: int
    force: int = 0  # 1: take even into debt (settling a token budget)


class Reply(NamedTuple):
    """The script's answer for one bucket, times in seconds."""

    allowed: bool  # this bucket had the tokens (the request may still be denied by another)
    remaining: int
    retry_after: float  # until `cost` tokens are there (0 when allowed)
    next_token: float  # until at least one token is there
    reset: float  # until the bucket is full


def _replies(flat: Sequence[int], count: int) -> list[Reply]:
    """The script's flat integers, five per bucket, as Replies."""
    return [
        Reply(flat[i] == 1, flat[i + 1], flat[i + 2] / 1e6, flat[i + 3] / 1e6, flat[i + 4] / 1e6)
        for i in range(0, 5 * count, 5)
    ]


# A request's replies as the script gave them: five integers per bucket, in the order of its
# Takes (allowed, remaining, then the waits in microseconds; see _replies).
Deliver = Callable[[Sequence[int] | None, BaseException | None], None]
Batch = list[tuple[Sequence[Take], Deliver]]


class RedisBuckets:
    """Coalesces bucket operations into pipelined EVALSHA round trips with a deadline.

    `atomic`: a request's buckets are taken all or nothing (one script call with all its
    keys); False on Redis Cluster, where each key is its own call and a denied request's
    tokens must be given back by the caller. `on_round_trip(seconds, skew)` is told each
    successful round trip's latency and Redis's clock minus ours; `on_error(exc)` each failed
    one.
    """

    def __init__(
        self,
        client: Any,  # redis.asyncio.Redis or RedisCluster
        *,
        timeout: float,
        on_round_trip: Callable[[float, float], None],
        on_error: Callable[[BucketsUnavailable], None],
    ) -> None:
        self.client = client
        self.timeout = timeout
        self.script = LuaScript("token_bucket.lua")
        self.atomic = not isinstance(client, RedisCluster)
        self._on_round_trip = on_round_trip
        self._on_error = on_error
        self._pending: Batch = []
        self._batch: Batch | None = None  # the batch out now
        self._calls: list[Sequence[Take]] = []
        self._first: list[Any] = []  # replies of a batch whose NOSCRIPT calls are retried
        self._scheduled = False
        self._deadline: asyncio.TimerHandle | None = None
        self._started = 0.0
        self._wire: RespWire | None = None
        self._conn: Any = None  # the redis-py connection the wire was taken from
        self._tasks: set[asyncio.Task[None]] = set()  # connecting; Cluster round trips
        self._args: dict[tuple[str, str, int, int], bytes] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    async def start(self) -> None:
        """Register the script (every primary, on a Cluster); RedisError if Redis refuses."""
        self._loop = asyncio.get_running_loop()
        await self.load()

    async def load(self) -> None:
        await self.script.load(self.client)

    async def close(self) -> None:
        self.closed = True
        for task in list(self._tasks):
            await cancel(task)
        self._fail(BucketsUnavailable("the gateway is stopping"), count=False)
        pending, self._pending = self._pending, []
        for _, deliver in pending:
            _guard(deliver, None, BucketsUnavailable("the gateway is stopping"))
        await self._drop_connection()

    def take(self, takes: Sequence[Take]) -> asyncio.Future[list[Reply]]:
        """Queue one request's bucket operations; the future gets one Reply per Take."""
        count = len(takes)
        return self._future(takes, lambda flat: _replies(flat, count))

    def take_flat(self, takes: Sequence[Take]) -> asyncio.Future[Sequence[int]]:
        """`take()` with the script's integers as they came (five per Take, see _replies)."""
        return self._future(takes, lambda flat: flat)

    def _future(
        self, takes: Sequence[Take], result: Callable[[Sequence[int]], T]
    ) -> asyncio.Future[T]:
        future: asyncio.Future[T] = self.loop.create_future()

        def deliver(flat: Sequence[int] | None, exc: BaseException | None) -> None:
            if not future.done():
                if flat is None:
                    future.set_exception(exc or BucketsUnavailable("no reply"))
                else:
                    future.set_result(result(flat))

        self.take_then(takes, deliver)
        return future

    def take_then(self, takes: Sequence[Take], deliver: Deliver) -> None:
        """`take()` for callers without a task: `deliver(flat, None)` (five integers per Take,
        see _replies) or `deliver(None, BucketsUnavailable)`, once, within the deadline."""
        if self.closed:
            deliver(None, BucketsUnavailable("the gateway is stopping"))
            return
        self._pending.append((takes, deliver))
        if not self._scheduled and self._batch is None:
            self._scheduled = True
            self.loop.call_soon(self._flush)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    # --- one batch at a time ---------------------------------------------------------------

    def _flush(self) -> None:
        self._scheduled = False
        if self._batch is not None or not self._pending or self.closed:
            return
        batch, self._pending = self._pending, []
        self._batch = batch
        self._started = time.perf_counter()
        self._deadline = self.loop.call_later(self.timeout, self._late)
        try:
            if self.atomic:
                self._calls = [takes for takes, _ in batch]
            else:
                self._calls = [(take,) for takes, _ in batch for take in takes]
            if not self.atomic:
                self._spawn(self._cluster_round_trip(self._calls))
            elif self._wire is None or self._wire.closed:
                self._spawn(self._connect())
            else:
                self._send(self._calls)
        except Exception as exc:  # (whatever it is, the batch gets an answer)
            self._fail(BucketsUnavailable(f"{type(exc).__name__}: {exc}"))

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self) -> None:
        """A connection of the limiter's own (redis-py connects and authenticates it)."""
        await self._drop_connection()
        try:
            conn = await self.client.connection_pool.get_connection()
            self._conn = conn
            self._wire = take_over(conn)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._drop_connection()
            self._fail(BucketsUnavailable(f"{type(exc).__name__}: {exc}"))
            return
        if self._batch is not None:
            try:
                self._send(self._calls)
            except Exception as exc:
                self._fail(BucketsUnavailable(f"{type(exc).__name__}: {exc}"))

    def _send(self, calls: Sequence[Sequence[Take]], retried: list[int] | None = None) -> None:
        wire = self._wire
        assert wire is not None
        data = b"".join([self._packed(call) for call in calls])
        if retried is None:
            wire.send(data, len(calls), self._replied)
        else:  # the script first, then the calls that found it missing
            load = pack("SCRIPT", "LOAD", self.script.source)
            wire.send(load + data, len(calls) + 1, lambda r, e: self._replied(r, e, retried))

    def _replied(
        self,
        replies: list[Any] | None,
        error: BaseException | None,
        retried: list[int] | None = None,
    ) -> None:
        batch = self._batch
        if batch is None:  # the deadline answered it already
            return
        try:
            if error is not None:
                raise BucketsUnavailable(str(error))
            assert replies is not None
            if retried is not None:
                loaded, *again = replies
                if isinstance(loaded, Exception):
                    raise BucketsUnavailable(f"SCRIPT LOAD: {loaded}")
                replies = list(self._first)
                for i, reply in zip(retried, again, strict=True):
                    replies[i] = reply
            missing = [
                i for i, r in enumerate(replies)
                if isinstance(r, Exception) and str(r).startswith("NOSCRIPT")
            ]  # fmt: skip
            if missing and retried is None:
                self._first = replies
                self._send([self._calls[i] for i in missing], missing)
                return
            for reply in replies:
                if isinstance(reply, Exception):  # the script refused or failed: no verdict
                    raise BucketsUnavailable(f"script error: {reply}")
            elapsed = time.perf_counter() - self._started
            results = iter(replies)
            out: list[tuple[Deliver, Sequence[int]]] = []
            for takes, deliver in batch:
                if self.atomic:
                    out.append((deliver, next(results)))
                else:  # a call per key: their replies end to end, as one call's would be
                    out.append((deliver, [n for _ in takes for n in next(results)[:5]]))
            seconds, micros = replies[-1][-2], replies[-1][-1]
        except BucketsUnavailable as exc:
            self._fail(exc)
            return
        except Exception as exc:  # (a reply we cannot read: out of step)
            self._fail(BucketsUnavailable(f"unreadable reply: {type(exc).__name__}: {exc}"))
            self._discard_wire("an unreadable reply")
            return
        self._end()
        # Redis's clock at the middle of the round trip, against ours.
        _guard(self._on_round_trip, elapsed, seconds + micros / 1e6 - (time.time() - elapsed / 2))
        for deliver, result in out:
            _guard(deliver, result, None)

    def _late(self) -> None:
        """The deadline: the batch is answered now, without Redis; replies that may still come
        on this connection cannot be trusted to be in step, so it is dropped."""
        self._deadline = None
        if self._batch is None:
            return
        self._fail(BucketsUnavailable(f"no answer within {self.timeout * 1000:g} ms", slow=True))
        self._discard_wire("the limiter's deadline passed")

    def _discard_wire(self, reason: str) -> None:
        wire, self._wire = self._wire, None
        if wire is not None:
            wire.close(reason)
        conn, self._conn = self._conn, None
        if conn is not None:
            self._spawn(self._give_back(conn))

    def _end(self) -> None:
        self._batch = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._pending and not self._scheduled and not self.closed:
            self._scheduled = True
            self.loop.call_soon(self._flush)

    def _fail(self, exc: BucketsUnavailable, *, count: bool = True) -> None:
        """The batch out now is answered with `exc`; the next one starts afresh."""
        batch = self._batch
        if batch is None:
            return
        if self._wire is not None and self._wire.closed:
            self._discard_wire("closed")
        self._end()
        if count:
            _guard(self._on_error, exc)
        for _, deliver in batch:
            _guard(deliver, None, exc)

    async def _cluster_round_trip(self, calls: Sequence[Sequence[Take]]) -> None:
        """redis-py's Cluster pipeline: it routes each one-key call to its node."""
        try:
            replies = await self._cluster_pipeline(calls)
            missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
            if missing:
                await self.load()
                again = await self._cluster_pipeline([calls[i] for i in missing])
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # (RedisClusterException is not a RedisError)
            self._fail(BucketsUnavailable(f"{type(exc).__name__}: {exc}"))
            return
        self._replied(replies, None)

    async def _cluster_pipeline(self, calls: Sequence[Sequence[Take]]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for call in calls:
            # execute_command: the Cluster pipeline blocks its evalsha() helper, the raw
            # command is routed by its key like any other.
            keys = [take.key for take in call]
            args = [a for t in call for a in (t.interval_us, t.burst, t.cost, t.force)]
            pipe.execute_command("EVALSHA", self.script.sha, len(call), *keys, *args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    def _packed(self, call: Sequence[Take]) -> bytes:
        """EVALSHA <sha> <n> <keys> <interval burst cost force>... in RESP, parts cached."""
        parts = [
            b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$%d\r\n%d\r\n"
            % (3 + 5 * len(call), self.script.sha_bytes, len(str(len(call))), len(call))
        ]
        for take in call:
            key = take.key.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(key), key))
        for take in call:
            args = self._args.get(take[1:])
            if args is None:
                values = (take.interval_us, take.burst, str(take.cost), str(take.force))
                args = "".join(f"${len(v)}\r\n{v}\r\n" for v in values).encode()
                if len(self._args) < 4096:
                    self._args[take[1:]] = args
            parts.append(args)
        return b"".join(parts)

    async def _drop_connection(self) -> None:
        conn = self._conn
        self._conn = None
        self._discard_wire("the limiter's connection is replaced")
        if conn is not None:
            await self._give_back(conn)

    async def _give_back(self, conn: Any) -> None:
        """The redis-py connection behind a dropped wire: disconnected, back in its pool."""
        await release(conn)
        with contextlib.suppress(Exception):
            await self.client.connection_pool.release(conn)


def _guard(callback: Callable[..., None], *args: Any) -> None:
    """A callback of the limiter's (a decision, a round trip's report) that must not break the
    batch for the others."""
    try:
        callback(*args)
    except Exception:
        logger.exception("a rate-limit callback failed")


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
