"""The services as processes, for tests: one launcher and one port helper.

`free_port` is devtools.services' (the one the dev services and benchmarks use). `Launcher`
starts `python -m gateway` or `python -m upstream` with a clean environment (no contract variable
but those given) in a working directory of the test's own (so no .env file is read), each in a
process group of its own (a multi-worker gateway's workers included), collects their output, and
kills whatever is still running at the end. The `gateway_process` fixture (tests/conftest.py)
wraps it with the usual settings.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from devtools.services import free_port
from tests.conftest import service_env, wait_until

__all__ = ["Launcher", "Service", "free_port"]

LOOPBACK = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[2]
SHIPPED_POLICIES = ROOT / "config" / "ratelimits.toml"  # the default, relative to a checkout


@dataclass
class Service:
    """A service running as a process: its ports on 127.0.0.1 and everything it printed."""

    module: str
    proc: asyncio.subprocess.Process
    output: list[str]
    reader: asyncio.Future[None]
    http_port: int
    https_port: int = 0  # 0: none (the chat service has only one)
    admin_port: int = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    http = url

    @property
    def https(self) -> str:
        return f"https://{LOOPBACK}:{self.https_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    def log(self) -> str:
        return "\n".join(self.output)

    async def stop(self, sig: int = signal.SIGTERM, within: float = 30) -> int:
        """Signal the process (SIGTERM: a graceful stop) and its exit status."""
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), within)


async def answers(url: str) -> bool:
    """Whether an HTTP server answers `url` at all (TLS not verified)."""
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as session,
            session.get(url, allow_redirects=False) as resp,
        ):
            return resp.status < 500
    except aiohttp.ClientConnectionError:
        return False


class Launcher:
    """Starts service processes and, on close, kills those still running."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.started: list[Service] = []

    async def start(
        self,
        module: str,
        env: dict[str, Any],
        *,
        http_port: int,
        https_port: int = 0,
        admin_port: int = 0,
        ready: Sequence[str] = (),
        within: float = 30,
    ) -> Service:
        """`python -m module` with `env` over a clean environment; returns once every URL path
        in `ready` answers (`admin:/metrics` on the admin port, `/healthz` on the HTTP one)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            env=service_env(**env),
            cwd=self.cwd,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its workers, if any, are in its group: killed together
        )
        output: list[str] = []

        async def collect() -> None:
            assert proc.stdout is not None
            async for line in proc.stdout:
                output.append(line.decode(errors="replace").rstrip())

        reader = asyncio.ensure_future(collect())
        service = Service(module, proc, output, reader, http_port, https_port, admin_port)
        self.started.append(service)
        urls = [
            f"{service.admin_url}{where[6:]}" if where.startswith("admin:") else service.url + where
            for where in ready
        ]

        async def up() -> bool:
            if proc.returncode is not None:
                await asyncio.wait_for(service.reader, 10)
                raise AssertionError(f"{module} exited {proc.returncode}:\n{service.log()}")
            return all([await answers(url) for url in urls])

        if urls:
            await wait_until(up, within=within)
        return service

    async def gateway(
        self,
        *,
        redis_url: str,
        upstream_url: str,
        key_prefix: str,
        wait: bool = True,
        http_port: int | None = None,
        **env: Any,
    ) -> Service:
        """`python -m gateway` on 127.0.0.1, its ports free ones (`http_port` if given), users
        named in X-User-Id as in development, the shipped policies; `env` adds or overrides
        GATEWAY_* variables. Ready once its admin port (opened last) and its HTTP port answer;
        `wait=False` returns at once (for boot failures)."""
        ports = (http_port or free_port(), free_port(), free_port())
        variables = {
            "REDIS_URL": redis_url,
            "GATEWAY_UPSTREAM_URL": upstream_url,
            "GATEWAY_REDIS_KEY_PREFIX": key_prefix,
            "GATEWAY_USER_ID_HEADER": "any",
            "GATEWAY_HOST": LOOPBACK,
            "GATEWAY_HTTP_PORT": ports[0],
            "GATEWAY_HTTPS_PORT": ports[1],
            "GATEWAY_ADMIN_PORT": ports[2],
            "GATEWAY_RATELIMIT_CONFIG": SHIPPED_POLICIES,
            **env,
        }
        ready = ("admin:/metrics", "/healthz") if wait else ()
        return await self.start(
            "gateway",
            variables,
            http_port=ports[0],
            https_port=ports[1],
            admin_port=ports[2],
            ready=ready,
        )

    async def upstream(self, *, database_url: str, **env: Any) -> Service:
        """`python -m upstream` with the local model on a free port; ready once /healthz answers."""
        port = free_port()
        variables = {
            "DATABASE_URL": database_url,
            "UPSTREAM_LLM_PROVIDER": "local",
            "UPSTREAM_HOST": LOOPBACK,
            "UPSTREAM_PORT": port,
            **env,
        }
        return await self.start("upstream", variables, http_port=port, ready=("/healthz",))

    async def close(self) -> None:
        for service in self.started:
            if service.proc.returncode is None:
                os.killpg(service.proc.pid, signal.SIGKILL)  # the group start() created
                await service.proc.wait()
            try:  # a leftover child holding the pipe must not hang the suite
                await asyncio.wait_for(service.reader, 10)
            except TimeoutError:
                service.reader.cancel()

    async def __aenter__(self) -> Launcher:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
