"""The upstream side: keep-alive connections that parse responses with llhttp, and their pool.

One request at a time per connection (no pipelining upstream). A connection reports what it
parses to its owner (the exchange it serves) and knows nothing of HTTP semantics beyond framing:
1xx interim responses are skipped (the gateway never sends `Expect` upstream), a 101 hands the
connection's bytes over (WebSocket), and a response to HEAD ends with its head whatever its
Content-Length says (llhttp cannot be told the request method, so the parser is replaced before
the connection is used again). Timeouts are one timer per connection, checked against the time
of the last byte rather than re-armed per chunk: first byte (from the end of the request), then
silence between chunks. A connection paused because the client is slow to read is never
timed out for the silence that causes.

The pool keeps idle connections newest first, closes those idle longer than IDLE_SECONDS (below
aiohttp's own 75 s keep-alive, so the gateway is the side that closes), and caps open plus
connecting connections at GATEWAY_UPSTREAM_POOL_SIZE; past it, requests wait their turn.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import Protocol, cast
from urllib.parse import urlsplit

import httptools

from gateway.edge.flow import PEER, Reading

IDLE_SECONDS = 15.0
SWEEP_SECONDS = 5.0

NONE, FIRST_BYTE, BODY = 0, 1, 2  # what a connection's timer watches


class Owner(Protocol):
    """What an upstream connection tells the exchange it serves."""

    def response_head(self, status: int, headers: list[tuple[bytes, bytes]], reuse: bool) -> None:
        """The response head (after any 1xx); `reuse`: keep-alive as far as the upstream says."""

    def response_body(self, data: bytes) -> None:
        """A piece of the response body, de-chunked."""

    def response_end(self) -> None:
        """The response is complete."""

    def upstream_upgraded(self, rest: bytes) -> None:
        """A 101 arrived (after response_head); `rest` are the bytes after its head."""

    def upstream_failed(self, kind: str, exc: BaseException | None) -> None:
        """The connection broke, timed out or sent something unparsable (`kind` says which)."""

    def upstream_writing(self, writable: bool) -> None:
        """The request's write buffer crossed its high (False) or low (True) water mark."""


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to the upstream."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.reading: Reading | None = None
        self.owner: Owner | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.informational = False
        self.head_only = False  # the request was HEAD: no body, whatever the head says
        self.headed = False  # the current response's head was reported
        self.dirty = False  # the parser saw a HEAD response: replace it before reuse
        self.reused = False  # served a request before (a reset may be a keep-alive race)
        self.received = 0  # bytes of the current response
        self.idle_since = 0.0
        self.closed = False
        self.counted = True  # holds one of the pool's slots
        self.timer: asyncio.TimerHandle | None = None
        self.watching = NONE
        self.limit = 0.0
        self.last = 0.0

    # --- used by the exchange -------------------------------------------------------------

    def send(self, owner: Owner, data: bytes, *, head_only: bool) -> None:
        """Start a request: `data` is its head (and body, when it is all there)."""
        if self.dirty:
            self.parser = httptools.HttpResponseParser(self)
            self.dirty = False
        self.owner = owner
        self.head_only = head_only
        self.headed = False
        self.received = 0
        assert self.transport is not None
        self.transport.write(data)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def sent(self, first_byte_timeout: float) -> None:
        """The whole request is written: from now on the first byte is awaited."""
        if not self.headed:
            self._watch(FIRST_BYTE, first_byte_timeout)

    def watch_body(self, idle_timeout: float) -> None:
        self._watch(BODY, idle_timeout)

    def release(self) -> None:
        """The exchange is done with this connection: back to the pool if reusable."""
        self._unwatch()
        self.owner = None
        if self.reading is not None:
            self.reading.resume(PEER)
        self.pool.put(self)

    def close(self) -> None:
        """Abort: the connection cannot be reused (the exchange failed, or the client left)."""
        self._stop_timer()
        self.owner = None
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()

    def detach(self) -> asyncio.Transport:
        """For a tunnel: the transport leaves the pool's accounting and this protocol."""
        self._stop_timer()
        self.owner = None
        self.closed = True
        self.pool.lost(self)
        assert self.transport is not None
        return self.transport

    # --- timers ----------------------------------------------------------------------------

    def _watch(self, what: int, seconds: float) -> None:
        """Watch for silence. Lazy, like the client side's timer: one due earlier stays and
        re-arms itself, so a busy pooled connection makes no timer per request."""
        self.watching = what
        self.limit = seconds
        now = self.last = self.loop.time()
        timer = self.timer
        if timer is not None:
            if timer.when() <= now + seconds:
                return
            timer.cancel()
        self.timer = self.loop.call_at(now + seconds, self._check)

    def _unwatch(self) -> None:
        self.watching = NONE  # the timer, if any, finds nothing to do when it fires

    def _stop_timer(self) -> None:
        self.watching = NONE
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _check(self) -> None:
        self.timer = None
        if self.watching == NONE or self.owner is None:
            return
        now = self.loop.time()
        due = self.last + self.limit
        if now < due or (self.reading is not None and self.reading.blocked):
            # Data arrived meanwhile, or reading is paused for the client's sake: not silence.
            self.timer = self.loop.call_at(max(due, now + 0.05), self._check)
            return
        kind = "first_byte_timeout" if self.watching == FIRST_BYTE else "idle_timeout"
        self._fail(kind, None)

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not its subclasses
        self.transport = transport
        self.reading = Reading(transport)

    def data_received(self, data: bytes) -> None:
        if self.owner is None:  # bytes nobody asked for: the stream is out of step
            self.close()
            return
        self.last = self.loop.time()
        self.received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            owner = self.owner
            if owner is not None:
                owner.upstream_upgraded(data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            self._fail("bad_response", exc)

    def eof_received(self) -> bool:
        return False  # close: a response delimited by the connection's end ends here

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timer()
        owner, self.owner = self.owner, None
        self.pool.lost(self)
        if owner is not None:
            owner.upstream_failed("reset", exc)

    def pause_writing(self) -> None:
        owner = self.owner
        if owner is not None:
            owner.upstream_writing(False)

    def resume_writing(self) -> None:
        owner = self.owner
        if owner is not None:
            owner.upstream_writing(True)

    def _fail(self, kind: str, exc: BaseException | None) -> None:
        owner = self.owner
        self.close()
        if owner is not None:
            owner.upstream_failed(kind, exc)

    # --- llhttp callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200 and status != 101:
            self.informational = True  # 103 Early Hints and the like: not relayed
            return
        owner = self.owner
        if owner is None:
            return
        self.headed = True
        self._unwatch()
        owner.response_head(status, self.headers, self.parser.should_keep_alive())
        if self.head_only and self.owner is owner:
            self.dirty = True  # llhttp would wait for the body a HEAD response never has
            owner.response_end()

    def on_body(self, body: bytes) -> None:
        owner = self.owner
        if owner is not None:
            if self.dirty:
                self._fail("bad_response", None)  # a body after a HEAD response
                return
            owner.response_body(body)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        owner = self.owner
        if owner is not None and not self.dirty:
            owner.response_end()


class UpstreamPool:
    """Keep-alive connections to GATEWAY_UPSTREAM_URL, at most `size` open or opening."""

    def __init__(self, url: str, size: int) -> None:
        parts = urlsplit(url)
        self.secure = parts.scheme == "https"
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (443 if self.secure else 80)
        self.base_path = parts.path.rstrip("/").encode()
        default = 443 if self.secure else 80
        netloc = self.host if ":" not in self.host else f"[{self.host}]"
        if parts.port is not None and parts.port != default:
            netloc = f"{netloc}:{parts.port}"
        self.host_header = b"Host: %s\r\n" % netloc.encode("idna")
        self.size = size
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if self.secure else None
        self.idle: list[UpstreamConnection] = []
        self.open = 0  # connections open or being opened
        self.waiters: collections.deque[asyncio.Future[UpstreamConnection | None]] = (
            collections.deque()
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.closed = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def take(self) -> UpstreamConnection | None:
        """An idle connection now, if there is one (no await on the hot path)."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def acquire(self) -> UpstreamConnection:
        """An idle connection, else a new one, else the next one released (in order)."""
        while True:
            conn = self.take()
            if conn is not None:
                return conn
            if self.open < self.size:
                break
            waiter: asyncio.Future[UpstreamConnection | None] = self.loop.create_future()
            self.waiters.append(waiter)
            try:
                handed = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    got = waiter.result()
                    if got is not None:
                        self.put(got)  # handed over as we were cancelled: pass it on
                    else:
                        self._wake()
                else:
                    self.waiters.remove(waiter)
                raise
            if handed is not None:
                return handed
        self.open += 1
        try:
            _, protocol = await self.loop.create_connection(
                lambda: UpstreamConnection(self),
                self.host,
                self.port,
                ssl=self.ssl,
                server_hostname=self.host if self.ssl is not None else None,
            )
        except BaseException:
            self.open -= 1
            self._wake()
            raise
        return protocol

    def put(self, conn: UpstreamConnection) -> None:
        """A connection whose exchange is over and whose stream is in step."""
        if conn.closed or self.closed:
            conn.close()
            return
        conn.reused = True
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = self.loop.time()
        self.idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(SWEEP_SECONDS, self._sweep)

    def lost(self, conn: UpstreamConnection) -> None:
        """A connection closed (or became a tunnel): its slot is free."""
        if not conn.counted:
            return
        conn.counted = False
        self.open -= 1
        if conn in self.idle:
            self.idle.remove(conn)
        self._wake()

    def _wake(self) -> None:
        """A slot is free: the first waiter may open a connection."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = self.loop.time() - IDLE_SECONDS
        keep = []
        for conn in self.idle:
            if conn.idle_since < cutoff:
                conn.close()
            else:
                keep.append(conn)
        self.idle[:] = keep
        if self.idle:
            self._sweeper = self.loop.call_later(SWEEP_SECONDS, self._sweep)

    def close(self) -> None:
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in self.idle:
            conn.close()
        self.idle.clear()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.cancel()
