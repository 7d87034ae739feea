"""The limiter's own Redis wire: redis-py's internals it relies on, and that no failure of any
kind can leave a decision waiting."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from unittest import mock

import pytest
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisClusterException

from gateway.auth.identity import Identity
from gateway.limiting.buckets import BucketsUnavailable, RedisBuckets, Take
from gateway.limiting.limiter import Limiter
from gateway.limiting.policies import parse_policies
from gateway.limiting.resp import packed_by_redis_py, release, take_over
from gateway.metrics import Metrics


def test_our_packing_is_redis_pys() -> None:
    """The hot path packs EVALSHA itself; it must be byte for byte what redis-py sends."""
    buckets = RedisBuckets(
        mock.Mock(), timeout=1, on_round_trip=lambda *_: None, on_error=lambda _: None
    )
    call = [
        Take("pc:rl:chat:ab12", "3000000.0", "5", 1),
        Take("pc:rl:ip:cd34", "100000.0", "600", -2, 1),
    ]
    expected = packed_by_redis_py(
        ["EVALSHA", buckets.script.sha, 2, "pc:rl:chat:ab12", "pc:rl:ip:cd34",
         "3000000.0", "5", 1, 0, "100000.0", "600", -2, 1]
    )  # fmt: skip
    assert buckets._packed(call) == expected


async def test_a_redis_py_connection_can_be_taken_over(redis_url: str) -> None:
    """redis-py connects and authenticates; the wire then speaks on its transport. Fails
    loudly if a redis-py release no longer keeps the StreamWriter where the take-over looks."""
    client = Redis.from_url(redis_url)
    conn = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
    wire = take_over(conn)
    answered: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    wire.send(b"*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nECHO\r\n$2\r\nhi\r\n", 2,
              lambda replies, error: answered.set_result((replies, error)))  # fmt: skip
    replies, error = await asyncio.wait_for(answered, 5)
    assert error is None and replies == [b"PONG", b"hi"]
    wire.close()
    await release(conn)
    await client.aclose()


class Broken(Exception):
    """Not a RedisError, not an OSError: what redis-py 5.0.8 raised as a TypeError."""


def broken_client(exc: BaseException) -> Any:
    client = mock.Mock(spec=Redis)
    client.script_load = mock.AsyncMock(return_value="sha")
    client.connection_pool = mock.Mock()
    client.connection_pool.get_connection = mock.AsyncMock(side_effect=exc)
    client.connection_pool.release = mock.AsyncMock()
    return client


def broken_cluster(exc: BaseException) -> Any:
    client = mock.Mock(spec=RedisCluster)  # isinstance(client, RedisCluster): the Cluster path
    client.script_load = mock.AsyncMock(return_value="sha")
    pipe = mock.Mock()
    pipe.execute = mock.AsyncMock(side_effect=exc)
    client.pipeline = mock.Mock(return_value=pipe)
    return client


POLICIES = """
[default]
rate = "10/minute"
burst = 10
failure_mode = "local"

[[rules]]
name = "chat"
path_prefix = "/v1/chat"
rate = "10/minute"
burst = 10
failure_mode = "closed"
"""


@pytest.mark.parametrize(
    "client",
    [
        broken_client(TypeError("unexpected keyword argument")),
        broken_client(Broken("anything")),
        broken_cluster(RedisClusterException("no slots")),
    ],
    ids=["TypeError", "any exception", "RedisClusterException"],
)
async def test_any_failure_is_decided_by_the_failure_mode_within_the_deadline(client: Any) -> None:
    limiter = Limiter(
        client,
        parse_policies(POLICIES, "test", "local"),
        Metrics(),
        prefix="t:",
        timeout=0.1,
        divisor=1,
    )
    await limiter.start()
    loop = asyncio.get_running_loop()
    answers: list[tuple[Any, Any]] = []
    started = time.monotonic()
    for path in ("/echo", "/v1/chat"):
        done: asyncio.Future[None] = loop.create_future()

        def decided(decision: Any, error: Any, done: asyncio.Future[None] = done) -> None:
            answers.append((decision, error))
            done.set_result(None)

        limiter.check_soon("GET", path, Identity("header", "u"), "127.0.0.1", None, decided)
        await asyncio.wait_for(done, 1)
    assert time.monotonic() - started < 1
    (local, none), (nothing, closed) = answers
    assert none is None and local.allowed and local.degraded  # local failure_mode
    assert nothing is None and closed.status == 503  # closed failure_mode
    assert not limiter.healthy  # the breaker opened: an error opens it at once
    # And the awaiting kind of caller is answered too.
    with pytest.raises(BucketsUnavailable):
        await asyncio.wait_for(limiter.buckets.take([Take("k", "1000000", "1", 1)]), 1)
    await limiter.close()
