"""Flow control, the one helper both sides share (after uvicorn's `flow_control.py`).

A transport's reading is paused while any reason to pause holds: the peer's transport is above
its high-water mark, a pipelined request waits its turn, a request body waits for its upstream
connection. Reasons are bits, so one side resuming never undoes another's pause.
"""

from __future__ import annotations

import asyncio

PEER = 1  # the other side's write buffer is above its high-water mark
PIPELINE = 2  # a complete request waits behind the one being answered
BODY = 4  # the body buffer is full and the upstream connection is not there yet


class Reading:
    """Pauses and resumes one transport's reading, by reason."""

    __slots__ = ("blocked", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.blocked = 0

    def pause(self, reason: int) -> None:
        if not self.blocked:
            self.transport.pause_reading()
        self.blocked |= reason

    def resume(self, reason: int) -> None:
        if self.blocked & reason:
            self.blocked &= ~reason
            if not self.blocked and not self.transport.is_closing():
                self.transport.resume_reading()
