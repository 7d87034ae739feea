"""scripts/loadtest and scripts/locustfile.py: a short real run against the real stack, and Ctrl-C.

Locust (gevent) patches the standard library when imported, so it only ever runs in a
subprocess here, never inside pytest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import service_env, sync_wait

ROOT = Path(__file__).resolve().parent.parent
LOADTEST = ROOT / "scripts" / "loadtest"
LOCUSTFILE = ROOT / "scripts" / "locustfile.py"


@pytest.fixture
def stack_env(database_url: str, redis_url: str) -> dict[str, str]:
    """The run's PostgreSQL and Redis, so the script starts no embedded servers (faster)."""
    return service_env(DATABASE_URL=database_url, REDIS_URL=redis_url)


def test_help_describes_the_options() -> None:
    result = subprocess.run(
        [sys.executable, str(LOADTEST), "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for option in ("--users", "--steps", "--spawn-rate", "--duration", "--out", "--limits"):
        assert option in result.stdout


def test_the_locustfile_loads_with_its_options() -> None:
    """`--list` imports the locustfile; its own options must parse (an unknown one exits 2)."""
    options = ["--think-time", "1,2", "--session-actions", "3", "--client-addresses"]
    result = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--list", *options],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "ChatUser" in result.stdout


def test_a_short_run_measures_and_reports(tmp_path: Path, stack_env: dict[str, str]) -> None:
    out = tmp_path / "report"
    argv = [str(LOADTEST), "--users", "5", "--spawn-rate", "5", "--duration", "4", "--warmup", "1"]
    result = subprocess.run(
        [sys.executable, *argv, "--out", str(out), "--think-time", "0.2,0.5"],
        env=stack_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [row] = json.loads((out / "summary.json").read_text())
    assert row["users"] == 5
    assert row["requests"] > 0 and row["rps"] > 0
    assert row["error_pct"] == 0, row["errors"]
    assert row["ttfe_ms"][0] > 0  # the custom SSE entry was recorded
    assert row["pool_max"] == 30 and row["pool_in_use_mean"] is not None
    assert row["gateway_fds_max"] > 0 and row["redis_ops"] > 0
    for name in ("users-5_stats.csv", "users-5_stats_history.csv", "users-5.html"):
        assert (out / name).stat().st_size > 0
    stats = (out / "users-5_stats.csv").read_text()
    assert "POST /v1/chat (stream)" in stats and "time to first event" in stats
    summary = (out / "summary.md").read_text()
    assert "| 5 |" in summary and "scripts/loadtest --users 5" in summary


def descendants(root: int) -> set[int]:
    parents: dict[int, set[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents.setdefault(int(stat[stat.rindex(")") + 2 :].split()[1]), set()).add(
                int(entry.name)
            )
    found, todo = set(), [root]
    while todo:
        kids = parents.get(todo.pop(), set())
        found |= kids
        todo += kids
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_ctrl_c_stops_everything_it_started(tmp_path: Path, stack_env: dict[str, str]) -> None:
    log = tmp_path / "stderr.log"
    with log.open("wb") as err:
        argv = [str(LOADTEST), "--users", "5", "--duration", "60", "--warmup", "0"]
        argv += ["--out", str(tmp_path / "out")]
        proc = subprocess.Popen(
            [sys.executable, *argv],
            env=stack_env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        # Locust is up and loading once every user is spawned: the locustfile then writes its
        # "measuring" mark (at once, with --warmup 0).
        measuring = tmp_path / "out" / "users-5.json.measuring"

        def loading() -> bool:
            assert proc.poll() is None, log.read_text()
            return measuring.exists()

        sync_wait(loading, 60, "locust loading the stack")
        children = descendants(proc.pid)
        assert len(children) >= 3  # upstream, gateway, locust
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, log.read_text()
        assert [pid for pid in children if alive(pid)] == []
        assert "interrupted" in log.read_text()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
