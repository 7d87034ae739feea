"""Background tasks with an owner, for both services.

asyncio keeps only a weak reference to a task: one nobody holds can be collected mid-flight, and
one nobody awaits at shutdown is destroyed pending. Every task a service starts outside a request
handler's own await is therefore either held by the object that started it and stopped with
`cancel()`, or spawned on a `Tasks`, which holds it until it ends and stops the rest at close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait until it has stopped (None: nothing to do)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class Tasks:
    """Owns fire-and-forget tasks: holds each until it ends, logs a failure nobody would see,
    and at `close()` cancels (or, with `wait`, first waits up to that long for) the rest."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._running: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._running)

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro)
        self._running.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._running.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("%s: background task failed", self.name, exc_info=exc)

    async def close(self, wait: float = 0.0) -> None:
        """Stop every task still running; with `wait` > 0 let them finish for that long first."""
        if wait > 0 and self._running:
            logger.info("waiting for %d background task(s) of %s", len(self._running), self.name)
            await asyncio.wait(list(self._running), timeout=wait)
        for task in list(self._running):
            await cancel(task)
