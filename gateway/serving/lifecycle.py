"""Process lifecycle state: in-flight requests, draining on SIGTERM, reloading on SIGHUP."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)

Reloader = Callable[[], Awaitable[None]]


class ReloadFailed(Exception):
    """A reloader could not apply the new configuration and kept the current one."""


class Lifecycle:
    """Counts requests in flight; knows whether the process is draining; runs reloaders."""

    def __init__(self) -> None:
        self.draining = False
        self.inflight = 0
        self.reloaders: list[tuple[str, Reloader]] = []
        self._idle: asyncio.Event | None = None

    def enter(self) -> None:
        self.inflight += 1

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0 and self._idle is not None:
            self._idle.set()

    async def drain(self, seconds: float) -> bool:
        """Stop being ready and wait until nothing is in flight; False if time ran out."""
        self.draining = True
        if self.inflight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True

    async def reload(self) -> None:
        """SIGHUP: run every registered reloader; one failing does not stop the others."""
        if not self.reloaders:
            logger.info("SIGHUP: nothing to reload")
        for name, reloader in self.reloaders:
            try:
                await reloader()
            except ReloadFailed as exc:
                logger.error("SIGHUP: %s not reloaded, keeping the current one: %s", name, exc)
            except Exception:
                logger.exception("SIGHUP: reloading %s failed; keeping the current one", name)
            else:
                logger.info("SIGHUP: reloaded %s", name)
