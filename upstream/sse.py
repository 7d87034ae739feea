"""Server-Sent Events framing (WHATWG HTML §9.2), pure."""

from __future__ import annotations

import json
from typing import Any

HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # nginx and similar proxies buffer responses unless told not to.
    "X-Accel-Buffering": "no",
}


def event(name: str, data: Any) -> bytes:
    """One event; compact JSON never contains a raw newline, so one `data:` line suffices."""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event: {name}\ndata: {payload}\n\n".encode()
