"""Fixtures for the container tests: podman, the image built on a local Debian base, containers.

The image is built once per session on a base made here with mmdebstrap (no registry is
reachable from these machines), both under tags of this run's own, and both removed at the end,
with every container a test started. The base rootfs tar and the wheels live in
scripts/build-image's temporary directory, which it deletes itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import RUN_ID, scratch_database

ROOT = Path(__file__).resolve().parents[2]
BUILD_IMAGE = ROOT / "scripts" / "build-image"
TOOLS = ("podman", "runc", "mmdebstrap")
BUILD_TIMEOUT = 600


@dataclass
class Podman:
    """podman with this machine's containers.conf (scripts/build-image writes it)."""

    env: dict[str, str]
    started: list[str] = field(default_factory=list)

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        done = subprocess.run(
            ["podman", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args[:2])} exited {done.returncode}: {done.stderr[-3000:]}"
            )
        return done.stdout

    async def arun(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        """`run` off the event loop, so servers in the test's loop keep answering."""
        return await asyncio.to_thread(self.run, *args, check=check, timeout=timeout)

    def inspect(self, name: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = json.loads(self.run("inspect", name))
        return found[0]

    def logs(self, name: str, tail: int | None = 40) -> str:
        """The container's output (its last `tail` lines), for failure messages."""
        limit = [] if tail is None else ["--tail", str(tail)]
        done = subprocess.run(
            ["podman", "logs", *limit, name],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return f"--- {name} ---\n{done.stdout}{done.stderr}"

    async def start(self, name: str, *args: str) -> str:
        """`podman run -d --name NAME ARGS...`; removed when the test ends."""
        self.started.append(name)
        return (await self.arun("run", "-d", "--name", name, *args)).strip()

    async def health(self, name: str) -> dict[str, Any]:
        """Run the container's HEALTHCHECK now (what podman's systemd timer would do) and
        return its recorded state: {"Status": ..., "Log": [...]}."""
        await self.arun("healthcheck", "run", name, check=False)
        state = (await asyncio.to_thread(self.inspect, name))["State"]
        health: dict[str, Any] = state.get("Health") or state.get("Healthcheck") or {}
        return health

    async def process_uid(self, name: str) -> int:
        """The real uid of the container's main process (its pid 1)."""
        status = await self.arun("exec", name, "cat", "/proc/1/status")
        line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        return int(line.split()[1])


def build_image(*args: str, env: dict[str, str]) -> None:
    done = subprocess.run(
        [str(BUILD_IMAGE), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(
            f"scripts/build-image {' '.join(args)} exited {done.returncode}:\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        )


@pytest.fixture(scope="session")
def podman_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not installed: the image tests build and run containers "
            "(apt-get install podman buildah mmdebstrap runc; .ci/run installs them)"
        )
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    subprocess.run([str(BUILD_IMAGE), "--write-containers-conf", str(conf)], check=True)
    env = dict(os.environ, CONTAINERS_CONF=str(conf), PYTHON=sys.executable)
    return env


@pytest.fixture(scope="session")
def local_base(podman_env: dict[str, str]) -> Iterator[str]:
    """A Debian bookworm base (python3 3.11, venv) made with mmdebstrap, once per session."""
    tag = f"localhost/pixelcraft-base:test-{RUN_ID}"
    try:
        build_image("--local-base", "--base-only", "--base", tag, env=podman_env)
        yield tag
    finally:
        Podman(podman_env).run("rmi", "--ignore", tag, check=False)


@pytest.fixture(scope="session")
def image(podman_env: dict[str, str], local_base: str) -> Iterator[str]:
    """The project's image (Dockerfile), built by scripts/build-image on the local base."""
    tag = f"localhost/pixelcraft-gateway:test-{RUN_ID}"
    try:
        build_image("--base", local_base, "--tag", tag, env=podman_env)
        yield tag
    finally:
        # --force: also any container of this run's image a failed test left behind.
        Podman(podman_env).run("rmi", "--force", "--ignore", tag, check=False)


@pytest.fixture
def podman(podman_env: dict[str, str]) -> Iterator[Podman]:
    """podman for one test; the containers it started are removed at the end."""
    runner = Podman(podman_env)
    yield runner
    if runner.started:
        runner.run("rm", "--force", "--time", "0", "--ignore", *runner.started, check=False)


@pytest.fixture(scope="session")
def image_database_url(postgres_admin_url: str) -> Iterator[str]:
    """A database of the container tests' own (the containers run migrations), dropped after."""
    yield from scratch_database(postgres_admin_url, f"pixelcraft_test_{RUN_ID}_image")


async def answers(session: aiohttp.ClientSession, url: str) -> bool:
    """Whether GET url is a 200 right now."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False
