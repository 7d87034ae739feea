"""LuaScript against a real Redis of the test's own (it flushes the script cache)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from devtools.services import RedisServer
from gateway.limiting.scripts import LuaScript


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[Redis]:
    with RedisServer(tmp_path / "redis") as server:
        client = Redis.from_url(server.url)
        yield client
        await client.aclose()


@pytest.mark.parametrize("name", ["token_bucket.lua", "lease.lua"])
async def test_sha_is_what_redis_names_the_script(private_redis: Redis, name: str) -> None:
    script = LuaScript(name)
    assert await private_redis.script_load(script.source) == script.sha
    assert script.sha_bytes == script.sha.encode()
    assert (await private_redis.script_exists(script.sha)) == [True]


async def test_call_recovers_after_script_flush(private_redis: Redis) -> None:
    script = LuaScript("lease.lua")
    key = f"lease-test:{uuid.uuid4().hex}"
    # never loaded: the first call loads it
    assert await script.call(private_redis, [key], "acquire", "a", 2, 10_000) == [1, 1]
    await private_redis.script_flush()
    assert (await private_redis.script_exists(script.sha)) == [False]
    assert await script.call(private_redis, [key], "acquire", "b", 2, 10_000) == [1, 2]
    assert (await private_redis.script_exists(script.sha)) == [True]
    assert await script.call(private_redis, [key], "acquire", "c", 2, 10_000) == [0, 2]
