"""GATEWAY_WORKERS > 1: a supervising process and N worker processes on the same ports.

Each worker is `python -m gateway --worker N`, binding the public port with SO_REUSEPORT so the
kernel spreads connections over them. Workers write their metrics into a shared
PROMETHEUS_MULTIPROC_DIR; the supervisor serves the sum on the admin port, forwards SIGTERM
(drain) and SIGHUP (reload) to every worker, and replaces a worker that dies. A worker that
exits 78 or 69 while starting stops the whole gateway with that status. The TLS certificate is
checked here first too (exit 69 naming the file), so a bad one is one error line, not N; each
worker then loads it for itself and reloads it on the forwarded SIGHUP. The supervisor writes
GATEWAY_PID_FILE: its pid is the one to signal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
from typing import Any

from aiohttp import web
from prometheus_client import multiprocess

from gateway.limiting.admin import admin_limits
from gateway.metrics import Metrics, create_admin_app
from gateway.serving import pidfile
from gateway.settings import GatewaySettings
from gateway.tls.certificates import TLSFileError, load_pair
from pixelcraft.boot import EX_CONFIG, EX_UNAVAILABLE, DependencyUnavailable

logger = logging.getLogger(__name__)

RESTART_DELAY = 1.0


class Supervisor:
    def __init__(self, settings: GatewaySettings, metrics_dir: str) -> None:
        self.settings = settings
        self.metrics_dir = metrics_dir
        self.workers: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = False
        self.exit_code = 0

    async def spawn(self, index: int) -> None:
        # prometheus_client chooses its multiprocess mode by this variable, at import.
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "--worker", str(index), env=env
        )
        self.workers[index] = proc
        logger.info("worker %d started (pid %d)", index, proc.pid)

    async def watch(self, index: int) -> None:
        """Wait for worker `index`; replace it if it died while we are not stopping."""
        while True:
            proc = self.workers[index]
            code = await proc.wait()
            multiprocess.mark_process_dead(proc.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
            if self.stopping:
                return
            if code in (EX_CONFIG, EX_UNAVAILABLE):
                logger.error("worker %d exited %d while starting; stopping", index, code)
                self.exit_code = code
                self.signal_all(signal.SIGTERM)
                self.stopping = True
                return
            logger.error("worker %d (pid %d) exited %d; restarting", index, proc.pid, code)
            await asyncio.sleep(RESTART_DELAY)
            if self.stopping:
                return
            await self.spawn(index)

    def signal_all(self, sig: int) -> None:
        for proc in self.workers.values():
            if proc.returncode is None:
                proc.send_signal(sig)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.signal_all(signal.SIGHUP))
        settings = self.settings
        metrics = Metrics(multiprocess_dir=self.metrics_dir)
        runner = web.AppRunner(create_admin_app(metrics, admin_limits(settings)), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(
                runner, settings.gateway_admin_host, settings.gateway_admin_port
            ).start()
            for index in range(settings.gateway_workers):
                await self.spawn(index)
            if settings.gateway_pid_file is not None:
                pidfile.write(settings.gateway_pid_file)
            watchers = [
                asyncio.ensure_future(self.watch(i)) for i in range(settings.gateway_workers)
            ]
            done_all: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*watchers))
            stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
            await asyncio.wait([done_all, stopped], return_when=asyncio.FIRST_COMPLETED)
            self.stopping = True
            self.signal_all(signal.SIGTERM)
            try:
                await asyncio.wait_for(
                    asyncio.gather(*(p.wait() for p in self.workers.values())),
                    timeout=settings.gateway_drain_seconds + 10,
                )
            except TimeoutError:
                logger.error("workers did not exit after draining; killing them")
                self.signal_all(signal.SIGKILL)
            stopped.cancel()
            await asyncio.gather(done_all, return_exceptions=True)
            if (
                any(p.returncode not in (0, None) for p in self.workers.values())
                and not self.exit_code
            ):
                codes = {p.returncode for p in self.workers.values()}
                logger.warning("worker exit statuses: %s", codes)
            return self.exit_code
        finally:
            if settings.gateway_pid_file is not None:
                pidfile.remove(settings.gateway_pid_file)
            await runner.cleanup()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)


async def supervise(settings: GatewaySettings) -> int:
    if settings.gateway_tls_cert_file is not None and settings.gateway_tls_key_file is not None:
        try:
            load_pair(settings.gateway_tls_cert_file, settings.gateway_tls_key_file)
        except TLSFileError as exc:
            raise DependencyUnavailable(f"cannot serve HTTPS: {exc}") from exc
    metrics_dir = tempfile.mkdtemp(prefix="pixelcraft-metrics-")
    try:
        return await Supervisor(settings, metrics_dir).run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
