"""pixelcraft.logs owns the log line shapes: the access log's helpers render exactly what
`logging` renders for the same fields, in text and in JSON."""

from __future__ import annotations

import io
import json
import logging

from gateway.edge.accesslog import AccessLog
from pixelcraft import logs


def record(message: str) -> logging.LogRecord:
    rec = logging.LogRecord("gateway.access", logging.INFO, __file__, 1, message, None, None)
    rec.request_id = "rid-1"
    return rec


def test_text_line_is_what_logging_writes() -> None:
    rec = record("GET /v1/x 200 5 1.0ms id=ip:127.0.0.1")
    formatter = logging.Formatter(logs.TEXT_FORMAT)
    asctime = formatter.formatTime(rec)
    expected = formatter.format(rec) + "\n"
    assert logs.text_line(asctime, rec.process or 0, "INFO", rec.name, "rid-1", rec.msg) == (
        expected
    )


def test_json_entry_is_what_the_json_formatter_writes() -> None:
    rec = record("hello")
    written = json.loads(logs.JsonFormatter().format(rec))
    entry = logs.json_entry(written["ts"], "INFO", rec.name, rec.process or 0, "rid-1", "hello")
    assert written == entry


def test_access_lines_have_the_shared_shapes() -> None:
    out = io.StringIO()
    text = AccessLog("text", out)
    text.write("rid-2", "GET", "/v1/x", 200, 5, 0.001, "ip:127.0.0.1", None)
    line = out.getvalue()
    stamp, rest = line[:23], line[24:]
    assert rest.startswith(f"{text.pid} INFO gateway.access [rid-2] GET /v1/x 200 5 1.0ms ")
    assert stamp[4] == "-" and stamp[19] == ","  # "%Y-%m-%d %H:%M:%S,mmm" like asctime

    out = io.StringIO()
    AccessLog("json", out).write("rid-3", "POST", "/v1/chat", 429, 9, 0.002, "u1", "client")
    fields = json.loads(out.getvalue())
    assert list(fields)[:6] == ["ts", "level", "logger", "pid", "request_id", "message"]
    assert fields["logger"] == "gateway.access" and fields["request_id"] == "rid-3"
    assert fields["status"] == 429 and fields["aborted"] == "client"
