"""What `scripts/bench` and `scripts/loadtest` share: the processes they start, /proc accounting,
loopback HTTP, ports and Redis clean-up.

`Processes` starts each process in a session of its own that also ends when the script dies
(`exit_with_parent`), so that stopping it stops exactly what the script started; each script
passes in its own error class (raised when a process will not start or a tool fails), its own
`say` (for the messages about stopping) and its stop timeout. The /proc helpers read Linux's
accounting: a process tree's CPU time, the machine's busy jiffies, open file descriptors and
`kB` lines of /proc/<pid>/status.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import platform
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from redis import Redis

from devtools.services import descendants, exit_with_parent, free_port, stat_fields

CLK_TCK = os.sysconf("SC_CLK_TCK")
TAIL_LINES = 20


# --- processes ------------------------------------------------------------------------------


@dataclass
class Service:
    """A process started by `Processes`: its name, the process and where its output goes."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path | None  # None: a tool run by `Processes.run`, its output captured

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = TAIL_LINES) -> str:
        """The last lines of its log ("" when there is none yet)."""
        text = self.log.read_text(errors="replace") if self.log and self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Processes:
    """Every process a script starts, each in a session of its own, so exactly those stop.

    A process's output goes to `logdir`/<name>.log unless `start` names another file; `error` is
    the script's exception for a process that will not start or a tool that fails, `say` its
    progress line, `stop_timeout` how long a process may take after SIGTERM."""

    logdir: Path
    error: type[Exception]
    say: Callable[[str], None]
    stop_timeout: float
    started: list[Service] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path,
        log: Path | None = None,
    ) -> Service:
        """Start a long-running process (env None: this process's environment)."""
        path = log or self.logdir / f"{name}.log"
        with path.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=exit_with_parent(signal.SIGTERM),  # even if the script is SIGKILLed
            )
        service = Service(name, proc, path)
        self.started.append(service)
        return service

    def run(self, name: str, argv: Sequence[str], timeout: float) -> str:
        """Run a short-lived tool (a load generator) to completion; its stdout."""
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=exit_with_parent(signal.SIGTERM),
        )
        self.started.append(Service(name, proc, None))
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self.error(f"{name} did not finish within {timeout:.0f}s") from None
        if proc.returncode != 0:
            raise self.error(f"{name} exited with {proc.returncode}: {err.decode().strip()}")
        return out.decode()

    def wait_http(self, service: Service, url: str, timeout: float) -> None:
        """Poll url until it answers 200; fail with the log's tail if the process exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if service.proc.poll() is not None:
                raise self.error(
                    f"{service.name} exited with status {service.proc.returncode}:\n"
                    + service.tail()
                )
            if http_get(url)[0] == 200:
                return
            time.sleep(0.1)
        raise self.error(
            f"{service.name} did not answer {url} within {timeout:.0f}s:\n{service.tail()}"
        )

    def stop(self, service: Service) -> None:
        """Stop one process: see `stop_all`."""
        self._stop([service])

    def stop_all(self) -> None:
        """Stop every process started, the last started first: see `_stop`."""
        self._stop(list(reversed(self.started)))

    def _stop(self, services: list[Service]) -> None:
        """SIGTERM each live process group, wait (stop_timeout in all), SIGKILL a group that
        lingers; then SIGKILL what is left of the groups (workers left behind), saying so."""
        live = [service for service in services if service.proc.poll() is None]
        for service in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(service.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for service in live:
            try:
                service.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"{service.name} ignored SIGTERM: SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(service.pid, signal.SIGKILL)
                service.proc.wait()
        for service in services:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(service.pid, 0)
                self.say(
                    f"warning: processes of {service.name} (group {service.pid}) were still "
                    "alive: SIGKILL"
                )
                os.killpg(service.pid, signal.SIGKILL)


def interrupt(signum: int, frame: FrameType | None) -> None:
    """A SIGINT / SIGTERM handler: unwind as for Ctrl-C, so that everything started stops."""
    raise KeyboardInterrupt


# --- loopback -------------------------------------------------------------------------------


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    """(status, body, headers with lower-case names) of a GET on an http://host:port/ URL, or
    (0, b"", {}) if nothing answers."""
    rest = url.removeprefix("http://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/" + path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()}
    except (OSError, http.client.HTTPException):
        return 0, b"", {}
    finally:
        conn.close()


def distinct_ports(count: int) -> list[int]:
    """`count` free ports, all different."""
    ports: list[int] = []
    while len(ports) < count:
        if (port := free_port()) not in ports:
            ports.append(port)
    return ports


def delete_keys(client: Redis, prefix: str) -> int:
    """UNLINK every key under prefix; how many there were (RedisError for the caller)."""
    deleted = 0
    batch: list[Any] = []
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        batch.append(key)
        if len(batch) == 1000:
            deleted += int(client.unlink(*batch))
            batch = []
    if batch:
        deleted += int(client.unlink(*batch))
    return deleted


# --- /proc accounting -----------------------------------------------------------------------


def process_tree(root: int | None) -> list[int]:
    """root and all its descendants (nothing for None)."""
    return [] if root is None else [root, *descendants(root)]


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of the processes (all their threads), in seconds."""
    ticks = 0
    for pid in pids:
        if fields := stat_fields(pid):
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return total - idle, total


def open_fds(pids: Iterable[int]) -> int:
    """Open file descriptors of the processes."""
    count = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            count += len(os.listdir(f"/proc/{pid}/fd"))
    return count


def status_kb(pid: int, key: str) -> int:
    """A `kB` line of /proc/<pid>/status (VmRSS, VmHWM), 0 when the process is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"
