"""The model's usage report, found in a response while it streams through. Pure.

Our chat service ends a stream with `event: done` whose data has `usage`; an OpenAI-compatible
upstream puts a `usage` object in the last `data:` chunk (before `data: [DONE]`); a JSON answer
(`"stream": false`) has it at the top level. The watcher only looks: chunks are forwarded as
they come, and it keeps at most the event in progress (bounded) to parse the one that carries
`usage`.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

MAX_EVENT = 256 * 1024  # an event longer than this is not looked into


def tokens_of(document: Any) -> int | None:
    """`usage.total_tokens` (or prompt + completion) of a parsed JSON object, if any."""
    if not isinstance(document, dict):
        return None
    usage = document.get("usage")
    if not isinstance(usage, dict):
        return None
    total = usage.get("total_tokens")
    if isinstance(total, int) and not isinstance(total, bool) and total >= 0:
        return total
    parts = [usage.get("prompt_tokens"), usage.get("completion_tokens")]
    if all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in parts):
        return int(parts[0]) + int(parts[1])  # type: ignore[arg-type]
    return None


def event_tokens(event: bytes) -> int | None:
    """The usage in one SSE event's data lines, if it has one."""
    if b"usage" not in event:
        return None
    data = b"\n".join(
        line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:")
    )
    try:
        return tokens_of(json.loads(data))
    except ValueError:
        return None


class UsageWatcher:
    """Feed it the response body chunk by chunk; `tokens` is the last usage reported."""

    def __init__(self, content_type: str) -> None:
        self.sse = content_type.startswith("text/event-stream")
        self.json = "json" in content_type
        self.tokens: int | None = None
        self._event = b""

    def feed(self, chunk: bytes) -> None:
        if self.sse:
            buffered = self._event + chunk
            *events, rest = buffered.replace(b"\r\n", b"\n").split(b"\n\n")
            for event in events:
                found = event_tokens(event)
                if found is not None:
                    self.tokens = found
            self._event = rest if len(rest) <= MAX_EVENT else b""
        elif self.json and len(self._event) <= MAX_EVENT:
            self._event += chunk

    def close(self) -> None:
        """The body ended: a JSON answer is parsed now."""
        if self.json and self._event:
            with contextlib.suppress(ValueError):
                self.tokens = tokens_of(json.loads(self._event))
        elif self.sse and self._event:
            found = event_tokens(self._event)
            if found is not None:
                self.tokens = found
        self._event = b""
