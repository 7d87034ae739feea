"""Token buckets: in Redis (the real, shared ones) and in process (the fallback). No HTTP here.

RedisBuckets runs `lua/token_bucket.lua` by EVALSHA (loaded once; NOSCRIPT, after a Redis
restart or on a new Cluster node, loads it again and retries). One script call per request
takes from all of its buckets at once, all or nothing. Calls are coalesced: a single flusher
task sends whatever requests queued while the previous round trip was out, as one pipelined
write on a connection of its own, and reads the replies in order. Under load that is one round
trip for many requests, which is what keeps the limiter's cost per request small. Every round
trip has a deadline; a failure of any kind is one BucketsUnavailable for the whole batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, NamedTuple

from redis.asyncio import RedisCluster
from redis.exceptions import NoScriptError, RedisError, ResponseError

from pixelcraft.aio import cancel

logger = logging.getLogger(__name__)


def script_source() -> str:
    return resources.files("gateway").joinpath("lua/token_bucket.lua").read_text("utf-8")


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


Batch = list[tuple[Sequence[Take], "asyncio.Future[list[Reply]]"]]


def _replies(flat: Sequence[int], count: int) -> list[Reply]:
    """The script's flat integers, five per bucket, as Replies."""
    return [
        Reply(flat[i] == 1, flat[i + 1], flat[i + 2] / 1e6, flat[i + 3] / 1e6, flat[i + 4] / 1e6)
        for i in range(0, 5 * count, 5)
    ]


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
        self.source = script_source()
        self.sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()
        self.atomic = not isinstance(client, RedisCluster)
        self._sha = self.sha.encode()
        self._on_round_trip = on_round_trip
        self._on_error = on_error
        self._pending: Batch = []
        self._wakeup = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._conn: Any = None  # the flusher's connection, kept (not on Cluster)
        self._conn_timeout: float | None = None
        self._args: dict[tuple[str, str, int, int], bytes] = {}

    async def start(self) -> None:
        """Register the script (every primary, on a Cluster) and start the flusher; RedisError
        if Redis refuses the script."""
        await self.load()
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def load(self) -> None:
        await self.client.script_load(self.source)

    async def close(self) -> None:
        await cancel(self._flusher)
        self._flusher = None
        for _, future in self._pending:
            if not future.done():
                future.set_exception(BucketsUnavailable("the gateway is stopping"))
        self._pending = []
        await self._drop_connection()

    def take(self, takes: Sequence[Take]) -> asyncio.Future[list[Reply]]:
        """Queue one request's bucket operations; the future gets one Reply per Take."""
        future: asyncio.Future[list[Reply]] = asyncio.get_running_loop().create_future()
        self._pending.append((takes, future))
        self._wakeup.set()
        return future

    async def _flush_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch, self._pending = self._pending, []
            if batch:
                await self._run(batch)

    async def _run(self, batch: Batch) -> None:
        if self.atomic:
            calls: list[Sequence[Take]] = [takes for takes, _ in batch]
        else:
            calls = [(take,) for takes, _ in batch for take in takes]
        try:
            raw = await self.execute(calls)
        except BucketsUnavailable as exc:
            self._on_error(exc)
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        replies = iter(raw)
        for takes, future in batch:
            if self.atomic:
                result = _replies(next(replies), len(takes))
            else:
                result = [_replies(next(replies), 1)[0] for _ in takes]
            if not future.done():  # its request may have been cancelled meanwhile
                future.set_result(result)

    async def execute(self, calls: Sequence[Sequence[Take]]) -> list[Sequence[int]]:
        """One pipelined round trip (two if the script must be loaded first), with the
        deadline; the raw script replies in order."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                replies = await self._send(calls)
                missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
                if missing:
                    await self.load()
                    again = await self._send([calls[i] for i in missing])
                    for i, reply in zip(missing, again, strict=True):
                        replies[i] = reply
        except TimeoutError:
            await self._drop_connection()  # replies may be on their way: never read them
            raise BucketsUnavailable(
                f"no answer within {self.timeout * 1000:g} ms", slow=True
            ) from None
        except (RedisError, OSError) as exc:
            await self._drop_connection()
            raise BucketsUnavailable(f"{type(exc).__name__}: {exc}") from exc
        for reply in replies:
            if isinstance(reply, Exception):  # the script refused or failed: not a verdict
                raise BucketsUnavailable(f"script error: {reply}") from reply
        elapsed = time.perf_counter() - started
        seconds, micros = replies[-1][-2], replies[-1][-1]
        # Redis's clock at the middle of the round trip, against ours.
        self._on_round_trip(elapsed, seconds + micros / 1e6 - (time.time() - elapsed / 2))
        return replies

    async def _send(self, calls: Sequence[Sequence[Take]]) -> list[Any]:
        if not self.atomic:
            return await self._cluster_pipeline(calls)
        conn = self._conn
        if conn is None:
            # A pool connection the flusher keeps (redis-py made it: TLS, unix socket, AUTH,
            # Sentinel's current primary), without its socket timeout while kept: the deadline
            # above bounds the round trip, and asyncio.wait_for per write would cost a task.
            conn = await self.client.connection_pool.get_connection()
            self._conn, self._conn_timeout = conn, conn.socket_timeout
            conn.socket_timeout = None
        # redis-py's pipeline packs each argument through its encoder and wraps every reply
        # in a timeout: most of the limiter's CPU, for nothing the deadline does not cover.
        await conn.send_packed_command(
            b"".join([self._packed(call) for call in calls]), check_health=False
        )
        replies: list[Any] = []
        for _ in calls:
            try:
                # inf: no timer per reply; on cancellation redis-py drops the connection.
                replies.append(await conn.read_response(timeout=math.inf))
            except ResponseError as exc:  # this reply only; the stream stays in step
                replies.append(exc)
        return replies

    def _packed(self, call: Sequence[Take]) -> bytes:
        """EVALSHA <sha> <n> <keys> <interval burst cost>... in RESP, argument parts cached."""
        parts = [
            b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$%d\r\n%d\r\n"
            % (3 + 5 * len(call), self._sha, len(str(len(call))), len(call))
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

    async def _cluster_pipeline(self, calls: Sequence[Sequence[Take]]) -> list[Any]:
        """redis-py's Cluster pipeline: it routes each one-key call to its node."""
        pipe = self.client.pipeline(transaction=False)
        for call in calls:
            # execute_command: the Cluster pipeline blocks its evalsha() helper, the raw
            # command is routed by its key like any other.
            keys = [take.key for take in call]
            args = [a for t in call for a in (t.interval_us, t.burst, t.cost, t.force)]
            pipe.execute_command("EVALSHA", self.sha, len(call), *keys, *args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    async def _drop_connection(self) -> None:
        """Give the flusher's connection back, closed: after a failure its replies cannot be
        trusted to be in step (redis-py usually closed it already)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.socket_timeout = self._conn_timeout
            with contextlib.suppress(RedisError, OSError):
                await conn.disconnect(nowait=True)
            await self.client.connection_pool.release(conn)


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
