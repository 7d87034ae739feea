"""AccessLog: one line per response, text or JSON, buffered and flushed."""

from __future__ import annotations

import io
import json
import os
import re

from gateway.edge import accesslog
from gateway.edge.accesslog import AccessLog
from tests.conftest import wait_until

ARGS = ("rid-1", "GET", "/v1/conversations", 200, 1234, 0.01234, "header")


def test_text_line() -> None:
    out = io.StringIO()
    AccessLog("text", out).write(*ARGS, None)
    assert re.fullmatch(
        rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} {os.getpid()} INFO gateway.access \[rid-1\] "
        r"GET /v1/conversations 200 1234 12\.3ms id=header\n",
        out.getvalue(),
    ), out.getvalue()


def test_text_line_of_an_aborted_response() -> None:
    out = io.StringIO()
    AccessLog("text", out).write(*ARGS, "upstream")
    assert out.getvalue().endswith(" 12.3ms id=header aborted=upstream\n")


def test_json_line() -> None:
    out = io.StringIO()
    log = AccessLog("json", out)
    log.write(*ARGS, None)
    log.write("rid-2", "POST", "/v1/chat", 502, 0, 1.5, "ip", "upstream")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", first.pop("ts"))
    assert first == {
        "level": "INFO",
        "logger": "gateway.access",
        "pid": os.getpid(),
        "request_id": "rid-1",
        "message": "access",
        "method": "GET",
        "path": "/v1/conversations",
        "status": 200,
        "bytes": 1234,
        "duration_ms": 12.34,
        "identity": "header",
        "plan": "default",
    }
    assert "aborted" not in first and second["aborted"] == "upstream"
    assert second["duration_ms"] == 1500.0


def test_a_plan_other_than_the_default_is_logged() -> None:
    out = io.StringIO()
    AccessLog("text", out).write(*ARGS, None, "pro")
    AccessLog("text", out).write(*ARGS, None)
    pro, default = out.getvalue().splitlines()
    assert pro.endswith(" id=header plan=pro") and default.endswith(" id=header")


def test_json_escapes_control_characters() -> None:
    """Whatever a field holds, one response is one line, read back as written."""
    out = io.StringIO()
    path = '/a\nb\r\x1b[31m"\\\x00é'
    AccessLog("json", out).write("rid", "GET", path, 200, 0, 0.0, "ip", None)
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert not any(ord(c) < 0x20 for c in text[:-1])
    assert json.loads(text)["path"] == path


async def test_lines_are_batched_until_the_interval_or_close() -> None:
    out = io.StringIO()
    log = AccessLog("text", out)
    log.start()
    log.write(*ARGS, None)
    assert out.getvalue() == ""  # buffered
    await wait_until(lambda: out.getvalue().count("\n") == 1, within=5)
    log.write(*ARGS, None)
    log.close()
    assert out.getvalue().count("\n") == 2


async def test_a_full_buffer_is_written_at_once() -> None:
    out = io.StringIO()
    log = AccessLog("json", out)
    log.start()
    for _ in range(accesslog.MAX_BUFFERED):
        log.write(*ARGS, None)
    assert out.getvalue().count("\n") == accesslog.MAX_BUFFERED
    log.close()
