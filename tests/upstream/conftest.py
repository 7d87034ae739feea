"""Fixtures for the chat service: settings on this run's database, a running app."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from upstream.app import create_app
from upstream.llm import ChatMessage, Provider, Usage
from upstream.settings import UpstreamSettings

UpstreamFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def upstream_settings(database_url: str) -> Callable[..., UpstreamSettings]:
    def build(**overrides: Any) -> UpstreamSettings:
        values: dict[str, Any] = {
            "database_url": database_url,
            "upstream_llm_provider": "local",
            "upstream_local_token_delay": 0,
            "upstream_startup_retry_seconds": 2,
            "db_pool_min_size": 1,
            "db_pool_max_size": 5,
            "db_pool_acquire_timeout": 2,
        }
        values.update(overrides)
        return UpstreamSettings(_env_file=None, **values)

    return build


@pytest.fixture
def make_upstream(
    aiohttp_client: Any, upstream_settings: Callable[..., UpstreamSettings]
) -> UpstreamFactory:
    """Start the real chat service on a socket: `await make_upstream(provider=..., **settings)`."""

    async def start(provider: Provider | None = None, **overrides: Any) -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = await aiohttp_client(
            create_app(upstream_settings(**overrides), provider=provider)
        )
        return client

    return start


class ScriptedProvider:
    """A model the test drives: each piece is released by the test, errors on demand."""

    name = "scripted"

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str | Usage | Exception | None] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.prompts: list[list[ChatMessage]] = []

    def send(self, *pieces: str | Usage | Exception | None) -> None:
        """Queue pieces; an Exception is raised when reached, None ends the stream."""
        for piece in pieces:
            self.queue.put_nowait(piece)

    async def stream(self, messages: Sequence[ChatMessage]) -> AsyncGenerator[str | Usage, None]:
        self.prompts.append(list(messages))
        try:
            while True:
                piece = await self.queue.get()
                if piece is None:
                    return
                if isinstance(piece, Exception):
                    raise piece
                yield piece
        finally:
            self.closed.set()


@pytest.fixture
def scripted() -> ScriptedProvider:
    return ScriptedProvider()
