"""Logging configured once from main(): text or JSON lines, the request id on every line."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from typing import Annotated, Literal

from pydantic import BeforeValidator

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

LogFormat = Literal["text", "json"]
LogLevel = Annotated[
    Literal["DEBUG", "INFO", "WARNING", "ERROR"],
    BeforeValidator(lambda v: v.upper() if isinstance(v, str) else v),
]


# The two line shapes, owned here: `configure` installs them for every logger, and the gateway's
# access log (which writes without `logging`, for speed) renders the same ones with these helpers.
TEXT_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s [%(request_id)s] %(message)s"
TEXT_TIME = "%Y-%m-%d %H:%M:%S"  # logging's asctime, then ",<milliseconds>"
JSON_TIME = "%Y-%m-%dT%H:%M:%S%z"


def text_line(
    asctime: str, pid: int, level: str, logger: str, request_id: str, message: str
) -> str:
    """One text line as TEXT_FORMAT renders it (with its newline)."""
    return f"{asctime} {pid} {level} {logger} [{request_id}] {message}\n"


def json_entry(
    ts: str, level: str, logger: str, pid: int, request_id: str, message: str
) -> dict[str, object]:
    """The members every JSON line starts with; a writer adds its own after them."""
    return {
        "ts": ts,
        "level": level,
        "logger": logger,
        "pid": pid,
        "request_id": request_id,
        "message": message,
    }


class RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the request being handled, if any."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = json_entry(
            self.formatTime(record, JSON_TIME),
            record.levelname,
            record.name,
            record.process or 0,
            getattr(record, "request_id", "-"),
            record.getMessage(),
        )
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: LogLevel, fmt: LogFormat) -> None:
    """Install one stderr handler on the root logger."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp logs every request at INFO; our own middleware decides what to say.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
