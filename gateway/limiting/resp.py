"""The limiter's Redis wire: one connection speaking RESP2 as an asyncio Protocol.

redis-py opens and authenticates the connection (TCP, TLS, unix socket, AUTH, SELECT, the
Sentinel's current primary); then the limiter takes its transport over. From there a batch of
pipelined commands is one write, and the replies are parsed by hiredis in `data_received` and
handed over in order, with no task, future or await per reply: that await-per-reply path was
most of the limiter's cost per request.

The take-over reads one private attribute of redis-py's asyncio Connection (`_writer`, the
StreamWriter it connected): this module is the only place that does, `redis` is capped below
9 in setup.cfg, and tests/gateway/limiting/test_resp.py fails loudly if a redis-py release moves it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError

Replies = list[Any]  # each an int, bytes, list, or hiredis.ReplyError


class WireLost(Exception):
    """The connection broke, or sent something that is not RESP."""


def pack(*args: bytes | str | int) -> bytes:
    """One command in RESP (an array of bulk strings)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class RespWire(asyncio.Protocol):
    """Pipelined commands out, replies in: `send(data, count, done)` calls `done(replies,
    None)` once `count` replies have arrived, or `done(None, error)` if the connection fails
    first. Batches are answered in the order they were sent."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.waiting: collections.deque[tuple[int, Replies, Callable[..., None]]] = (
            collections.deque()
        )
        self.closed = False

    def send(
        self, data: bytes, count: int, done: Callable[[Replies | None, Exception | None], None]
    ) -> None:
        if self.closed or self.transport is None:
            done(None, WireLost("the limiter's Redis connection is closed"))
            return
        self.waiting.append((count, [], done))
        self.transport.write(data)

    def close(self, reason: str = "closed") -> None:
        """Drop the connection; whatever waits gets WireLost."""
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self._lost(WireLost(reason))

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        try:
            reader.feed(data)
            while self.waiting:
                reply = reader.gets()
                if reply is False:
                    return
                count, replies, done = self.waiting[0]
                replies.append(reply)
                if len(replies) == count:
                    self.waiting.popleft()
                    done(replies, None)
            if reader.gets() is not False:  # a reply nobody asked for: out of step
                self.close("Redis sent a reply nobody asked for")
        except hiredis.ProtocolError as exc:
            self.close(f"Redis sent something that is not RESP: {exc}")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(WireLost(f"the limiter's Redis connection closed ({exc or 'EOF'})"))

    def _lost(self, error: WireLost) -> None:
        self.closed = True
        while self.waiting:
            _, _, done = self.waiting.popleft()
            done(None, error)


def take_over(conn: AbstractConnection) -> RespWire:
    """A connected redis-py connection's transport, now speaking through a RespWire. The
    redis-py connection object must not be used again (except `disconnect(nowait=True)`)."""
    if not conn.is_connected:
        raise RedisError("the connection redis-py handed over is not connected")
    writer: asyncio.StreamWriter | None = getattr(conn, "_writer", None)
    if writer is None:
        raise RedisError("redis-py's connection has no `_writer`: the take-over needs updating")
    transport = writer.transport
    wire = RespWire()
    transport.set_protocol(wire)
    wire.connection_made(transport)
    return wire


async def release(conn: AbstractConnection) -> None:
    """Let redis-py forget a taken-over connection (its transport is ours, closed or not)."""
    with contextlib.suppress(RedisError, OSError, RuntimeError):
        await conn.disconnect(nowait=True)


def packed_by_redis_py(args: Sequence[bytes | str | int]) -> bytes:
    """How redis-py itself packs a command (for the contract test of our packing)."""
    from redis.asyncio.connection import Connection

    return b"".join(Connection().pack_command(*args))
