"""Bytes on the wire: status lines, header blocks, chunk framing, problem bodies. Pure.

Everything that never changes is rendered once, at import; per-request work joins prepared
parts. Header names the gateway compares are lower-case bytes, as `bytes.lower()` gives them.
"""

from __future__ import annotations

import http
import time
from email.utils import formatdate

SERVER_NAME = "pixelcraft"  # neutral: no product versions for scanners
SERVER = b"Server: pixelcraft\r\n"
# RFC 6797 §7.1, Mozilla's guideline: HTTPS responses carry HSTS for two years (never HTTP ones).
HSTS = b"Strict-Transport-Security: max-age=63072000\r\n"
CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CLOSE = b"Connection: close\r\n"
KEEP_ALIVE = b"Connection: keep-alive\r\n"  # only to HTTP/1.0 clients that asked for it
CHUNKED = b"Transfer-Encoding: chunked\r\n"
CLIENT_CLOSED = 499  # nginx's code for "client closed the request"


def _phrase(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


# RFC 9112 §4: the reason phrase is informative only; an unknown code gets an empty one.
STATUS_LINES: dict[int, bytes] = {
    status: b"HTTP/1.1 %d %s\r\n" % (status, _phrase(status)) for status in range(100, 600)
}

# RFC 9110 §7.6.1: a proxy removes these and every header `Connection` names; `Trailer` too,
# since trailers are not forwarded. (`Upgrade` passes only on a WebSocket handshake.)
HOP_BY_HOP = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
     b"transfer-encoding", b"upgrade")
)  # fmt: skip
# Connection tokens that name no header to remove.
CONNECTION_OPTIONS = frozenset((b"keep-alive", b"close", b"upgrade"))


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (RFC 9112 §7.1)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def header_block(headers: dict[str, str]) -> bytes:
    """`Name: value` lines from a dict of header fields (values already valid)."""
    return "".join([f"{name}: {value}\r\n" for name, value in headers.items()]).encode("latin-1")


class Clock:
    """The Date header (RFC 9110 §6.6.1), rendered once a second."""

    __slots__ = ("_line", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def date(self) -> bytes:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._line = b"Date: %s\r\n" % formatdate(now, usegmt=True).encode()
        return self._line


# Request data that reaches a log line: control characters (C0, DEL, C1) and backslashes are
# written as escapes, so no client can forge a line break or a terminal sequence in the log.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_ESCAPES[ord("\\")] = "\\\\"


def printable(text: str) -> str:
    """`text` with every character that could forge or garble a log line escaped."""
    return text.translate(_ESCAPES)
