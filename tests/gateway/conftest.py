"""Fixtures for gateway tests: a scriptable upstream, the chat service, gateways in-process
(gateways as processes: `gateway_process` in tests/conftest.py)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp.test_utils import BaseTestServer, TestClient, TestServer
from aiohttp.web_runner import BaseRunner
from yarl import URL

from gateway.serving.server import Gateway
from gateway.settings import GatewaySettings
from tests.fakes.upstream import UpstreamState, create_fake_upstream
from upstream.app import create_app as create_upstream
from upstream.settings import UpstreamSettings


@dataclass
class FakeUpstream:
    url: str
    state: UpstreamState
    server: TestServer


@pytest.fixture
async def upstream(aiohttp_server: Any) -> FakeUpstream:
    state = UpstreamState()
    server = await aiohttp_server(create_fake_upstream(state))
    return FakeUpstream(str(server.make_url("")).rstrip("/"), state, server)


@pytest.fixture
def gateway_settings(redis_url: str, bucket_prefix: str) -> Callable[..., GatewaySettings]:
    def build(upstream_url: str, **overrides: Any) -> GatewaySettings:
        values: dict[str, Any] = {
            "redis_url": redis_url,
            "gateway_upstream_url": upstream_url,
            "gateway_redis_key_prefix": bucket_prefix,
            "gateway_startup_retry_seconds": 1,
            # Development mode: tests name their users in X-User-Id (test_identity.py covers
            # `trusted`, the default, and `off`).
            "gateway_user_id_header": "any",
        }
        values.update(overrides)
        return GatewaySettings(_env_file=None, **values)

    return build


@pytest.fixture
async def chat_service(aiohttp_server: Any, database_url: str) -> str:
    """The real chat service (local model) on a socket; its base URL."""
    settings = UpstreamSettings(
        _env_file=None,
        database_url=database_url,
        upstream_llm_provider="local",
        upstream_local_token_delay=0,
        db_pool_min_size=1,
        db_pool_max_size=5,
    )
    server = await aiohttp_server(create_upstream(settings))
    return str(server.make_url("")).rstrip("/")


GatewayFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


class GatewayServer(BaseTestServer):
    """The gateway in this process on a real socket: its app's contexts started and its data
    plane listening, as `python -m gateway` does minus the signals. `app` is the gateway app
    (its AppKeys: metrics, access log, lifecycle, plane)."""

    def __init__(self, settings: GatewaySettings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gateway = Gateway(settings)
        self.app = self.gateway.app

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return self.gateway.runner

    async def start_server(
        self, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any
    ) -> None:
        if self.runner:
            return
        await self.gateway.start()
        self.runner = self.gateway.runner
        sock = self.socket_factory(self.host, self.port or 0, socket.AF_INET)
        self.host, self.port = sock.getsockname()[:2]
        await self.gateway.plane.listen(self.gateway.api_site(tls=False), None, None, sock=sock)
        self.scheme = "http"
        self._root = URL(f"http://{self.host}:{self.port}")

    async def close(self) -> None:
        if self.started and not self.closed:
            await self.gateway.close()
            self._root = None
            self.port = None
            self._closed = True


@pytest.fixture
def make_gateway(
    aiohttp_client: Any, gateway_settings: Callable[..., GatewaySettings]
) -> GatewayFactory:
    """The gateway app on a real socket in this process: `await make_gateway(url, **settings)`."""

    async def start(upstream_url: str, **overrides: Any) -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = await aiohttp_client(
            GatewayServer(gateway_settings(upstream_url, **overrides))
        )
        return client

    return start
