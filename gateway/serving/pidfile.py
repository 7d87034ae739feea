"""GATEWAY_PID_FILE: where scripts/cert-deploy-hook finds the process to send SIGHUP to.

Written by the process that owns the signals (the only one, or the supervisor of the workers,
which forwards SIGHUP to each) once it listens, with a rename so a reader never sees it half
written; removed on exit unless another process has taken it over meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def write(path: Path) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        temporary.write_text(f"{os.getpid()}\n")
        temporary.replace(path)
    except OSError as exc:
        logger.warning("cannot write the pid file %s: %s", path, exc)
        with contextlib.suppress(OSError):
            temporary.unlink()


def remove(path: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text().strip()) == os.getpid():
            path.unlink()
