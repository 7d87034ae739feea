"""pixelcraft.aio.Tasks: background tasks held, failures logged, the rest stopped at close."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from pixelcraft.aio import Tasks
from tests.conftest import wait_until


async def test_a_task_is_held_until_it_ends() -> None:
    tasks = Tasks("test")
    go = asyncio.Event()
    done: list[int] = []

    async def work() -> None:
        await go.wait()
        done.append(1)

    tasks.spawn(work())  # nobody else keeps the task
    gc.collect()
    assert len(tasks) == 1
    go.set()
    await wait_until(lambda: len(tasks) == 0, within=5)
    assert done == [1]


async def test_a_failure_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    tasks = Tasks("checks")

    async def fail() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="pixelcraft.aio"):
        task = tasks.spawn(fail())
        await wait_until(lambda: len(tasks) == 0, within=5)
    assert task.done()
    (record,) = [r for r in caplog.records if r.name == "pixelcraft.aio"]
    assert record.getMessage() == "checks: background task failed"
    assert record.exc_info is not None and str(record.exc_info[1]) == "boom"


async def test_close_cancels_what_is_still_running(caplog: pytest.LogCaptureFixture) -> None:
    tasks = Tasks("test")
    task = tasks.spawn(asyncio.Event().wait())
    with caplog.at_level(logging.ERROR, logger="pixelcraft.aio"):
        await tasks.close()
    assert task.cancelled() and len(tasks) == 0
    assert not [r for r in caplog.records if r.name == "pixelcraft.aio"]  # not a failure


async def test_close_with_wait_lets_tasks_finish_first() -> None:
    tasks = Tasks("test")
    release = asyncio.Event()

    async def work() -> str:
        await release.wait()
        return "finished"

    task = tasks.spawn(work())
    asyncio.get_running_loop().call_soon(release.set)
    await tasks.close(wait=5)
    assert task.result() == "finished"
