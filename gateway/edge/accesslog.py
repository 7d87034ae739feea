"""The access log: one line per response, written in batches.

Going through `logging` costs a LogRecord, a formatter pass and a write(2) per request, which
measured at about a sixth of the gateway's CPU per proxied request (py-spy, `make bench`). Lines
here are rendered directly, by pixelcraft.logs's own helpers for the other lines' shapes (text
or JSON), and flushed together every FLUSH_INTERVAL or when the buffer fills.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import TextIO

from gateway.limiting.policies import DEFAULT_PLAN
from pixelcraft.logs import JSON_TIME, TEXT_TIME, LogFormat, json_entry, text_line

LOGGER = "gateway.access"
FLUSH_INTERVAL = 0.2
MAX_BUFFERED = 256


class AccessLog:
    """Formats and buffers access lines; `start()` inside the loop, `close()` flushes."""

    def __init__(self, fmt: LogFormat, stream: TextIO | None = None) -> None:
        self.fmt = fmt
        self.stream = stream if stream is not None else sys.stderr
        self.pid = os.getpid()
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._second = -1
        self._stamp = ""

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()

    def flush(self) -> None:
        self._timer = None
        if self._lines:
            self.stream.write("".join(self._lines))
            self.stream.flush()
            self._lines.clear()

    def write(
        self,
        request_id: str,
        method: str,
        path: str,
        status: int,
        size: int,
        elapsed: float,
        identity: str,
        aborted: str | None,
        plan: str = DEFAULT_PLAN,
    ) -> None:
        now = time.time()
        if self.fmt == "json":
            ts = time.strftime(JSON_TIME, time.localtime(now))
            fields = json_entry(ts, "INFO", LOGGER, self.pid, request_id, "access")
            fields["method"] = method
            fields["path"] = path
            fields["status"] = status
            fields["bytes"] = size
            fields["duration_ms"] = round(elapsed * 1000, 3)
            fields["identity"] = identity
            fields["plan"] = plan
            if aborted:
                fields["aborted"] = aborted
            line = json.dumps(fields, ensure_ascii=False) + "\n"
        else:
            second = int(now)
            if second != self._second:  # one strftime per second, not per request
                self._second = second
                self._stamp = time.strftime(TEXT_TIME, time.localtime(now))
            millis = int((now - second) * 1000)
            tail = f" aborted={aborted}" if aborted else ""
            if plan != DEFAULT_PLAN:
                tail += f" plan={plan}"
            line = text_line(
                f"{self._stamp},{millis:03d}",
                self.pid,
                "INFO",
                LOGGER,
                request_id,
                f"{method} {path} {status} {size} {elapsed * 1000:.1f}ms id={identity}{tail}",
            )
        self._lines.append(line)
        if len(self._lines) >= MAX_BUFFERED:
            self.flush()
        elif self._timer is None and self._loop is not None:
            self._timer = self._loop.call_later(FLUSH_INTERVAL, self.flush)
        elif self._loop is None:
            self.flush()
