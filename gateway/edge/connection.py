"""The client side: one Protocol per connection on the public ports.

llhttp's callbacks only collect; decisions are made once per message (`on_headers_complete`),
by an Exchange. Requests are answered in order: a request parsed while another is answered
waits in the pipeline, and reading pauses until its turn (so a pipelining client holds at most
what one read brought, and never more than MAX_PIPELINE requests). Every response leaves
through `write()`; framing is the exchange's business.

One timer per connection, for whichever deadline applies: the header deadline (the first
request's head within GATEWAY_HEADER_TIMEOUT of the connection, a later one within that of its
first byte: slowloris), keep-alive idleness (GATEWAY_KEEPALIVE_TIMEOUT), body silence
(GATEWAY_CLIENT_BODY_TIMEOUT: then a 408), and lingering. A connection whose response went out
before its request was read (413, 429, 408, malformed) says `Connection: close` and lingers:
it reads and drops what the client still sends for LINGER_SECONDS, so the client reads the
answer instead of a reset.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING, cast

import httptools

from gateway.auth.identity import Client, trusted_peer
from gateway.edge.exchange import Exchange
from gateway.edge.flow import PEER, PIPELINE, Reading
from gateway.edge.request import Request, parse_head
from gateway.errors import BadRequest, GatewayError, HeadersTooLarge, TargetTooLong

if TYPE_CHECKING:
    from gateway.edge.plane import DataPlane, Site

logger = logging.getLogger(__name__)

MAX_TARGET = 8 * 1024  # bytes of a request target (nginx: 8 KiB header lines)
MAX_HEAD = 64 * 1024  # bytes of a request line and header section
MAX_HEADERS = 100
MAX_PIPELINE = 64  # requests parsed ahead of the one being answered
LINGER_SECONDS = 2.0

HEADER, KEEPALIVE, BODY_SILENCE, LINGER = 1, 2, 3, 4


class PipelineFull(Exception):
    """More requests arrived ahead of their answers than MAX_PIPELINE."""


class Connection(asyncio.Protocol):
    """A client connection on a public port."""

    def __init__(self, plane: DataPlane, site: Site) -> None:
        self.plane = plane
        self.site = site
        self.scheme = site.scheme
        self.loop = plane.loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.reading: Reading = None  # type: ignore[assignment]  # set by connection_made
        self.peer = "unknown"
        self.peer_trusted = False
        self.client: Client | None = None  # None: resolved per request (trusted peer)
        self.origin = b""  # X-Forwarded-For and -Proto for an untrusted peer
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.in_head = False
        self.pending = 0  # bytes of the head's line in progress
        self.parsing: Exchange | None = None  # the exchange whose body is arriving
        self.active: Exchange | None = None  # the exchange being answered
        self.queue: collections.deque[Exchange] = collections.deque()
        self.starting = False
        self.stopped = False  # nothing more is parsed (refused, upgraded)
        self.closing = False
        self.writable = True
        self.upgrade_rest = b""
        self.timer: asyncio.TimerHandle | None = None
        self.timer_kind = 0
        self.deadline = 0.0
        self.body_seen = 0.0

    # --- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not its subclasses
        self.transport = transport
        self.reading = Reading(transport)
        plane = self.plane
        peername = transport.get_extra_info("peername")
        peer = str(peername[0]) if peername else "unknown"
        if peer.startswith("::ffff:") and "." in peer:
            peer = peer[7:]  # an IPv4 client on a dual-stack socket
        self.peer = peer
        if plane.trusted and trusted_peer(peer, plane.trusted):
            self.peer_trusted = True
        else:
            self.client = Client(peer, False)
            self.origin = b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\n" % (
                peer.encode(),
                self.scheme.encode(),
            )
        plane.connections.add(self)
        self._arm(HEADER, plane.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self.stopped:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgraded(data[exc.args[0] :])
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, GatewayError):
                self._refuse(cause)
            elif isinstance(cause, PipelineFull):
                self._refuse(BadRequest(f"more than {MAX_PIPELINE} pipelined requests"))
            else:
                logger.error("error while parsing a request", exc_info=cause)
                self._refuse(GatewayError("an unexpected error occurred"))
            return
        except httptools.HttpParserError as exc:
            # llhttp's messages are fixed texts ("Invalid header value char"): safe to echo.
            self._refuse(BadRequest(f"malformed request: {exc}"))
            return
        if self.in_head:
            if self.timer_kind != HEADER:  # a head that takes more than one read: slowloris?
                self._arm(HEADER, self.plane.header_timeout)
            # The head continues in the next read. llhttp holds the line in progress (a
            # header's partial value) in memory: count it too. Lines cannot hold a LF, so it
            # is what follows the last one.
            newline = data.rfind(b"\n")
            self.pending = self.pending + len(data) if newline < 0 else len(data) - newline - 1
            if self.pending + self.head_bytes > MAX_HEAD:
                self._refuse(HeadersTooLarge(f"the request head exceeds {MAX_HEAD} bytes"))

    def eof_received(self) -> bool:
        # A client that stops sending is gone, as nginx sees it: the request it made is
        # abandoned and the upstream request ends with it (HTTP clients do not half-close).
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.stopped = True
        self._cancel_timer()
        self.plane.connections.discard(self)
        active, self.active = self.active, None
        self.queue.clear()
        self.parsing = None
        if active is not None:
            active.client_gone()

    def pause_writing(self) -> None:
        self.writable = False
        active = self.active
        if active is not None and active.upstream is not None:
            reading = active.upstream.reading
            if reading is not None:
                reading.pause(PEER)

    def resume_writing(self) -> None:
        self.writable = True
        active = self.active
        if active is not None and active.upstream is not None:
            reading = active.upstream.reading
            if reading is not None:
                reading.resume(PEER)

    # --- llhttp callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_head = True
        self.pending = 0
        self.url = b""
        self.headers = []
        self.head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_bytes += len(url)
        if len(self.url) > MAX_TARGET:
            raise TargetTooLong(f"the request target exceeds {MAX_TARGET} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self.headers
        headers.append((name, value))
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > MAX_HEAD or len(headers) > MAX_HEADERS:
            raise HeadersTooLarge(
                f"the request head exceeds {MAX_HEAD} bytes or {MAX_HEADERS} header fields"
            )

    def on_headers_complete(self) -> None:
        self.in_head = False
        if self.timer_kind == HEADER or self.timer_kind == KEEPALIVE:
            self._disarm()  # a request is here: neither deadline applies while it is answered
        if len(self.queue) >= MAX_PIPELINE:
            raise PipelineFull
        parser = self.parser
        try:
            request = parse_head(
                parser.get_method(),
                self.url,
                parser.get_http_version(),
                parser.should_keep_alive(),
                parser.should_upgrade(),
                self.headers,
                self.peer_trusted,
            )
        except GatewayError as exc:
            self.stopped = True
            self._enqueue(Exchange(self, self._unparsed(), exc))
            return
        exchange = Exchange(self, request)
        if not exchange.body_done:
            self.parsing = exchange
            self.body_seen = self.loop.time()
            self._arm(BODY_SILENCE, self.plane.body_timeout)
        self._enqueue(exchange)

    def on_body(self, body: bytes) -> None:
        exchange = self.parsing
        if exchange is not None:
            self.body_seen = self.loop.time()
            exchange.body_received(body)

    def on_message_complete(self) -> None:
        exchange, self.parsing = self.parsing, None
        if self.timer_kind == BODY_SILENCE:
            self._disarm()
        if exchange is not None:
            exchange.body_complete()
        if self.active is None and not self.queue and not self.closing:
            self._arm(KEEPALIVE, self.plane.keepalive_timeout)

    # --- requests in order ----------------------------------------------------------------------

    def _enqueue(self, exchange: Exchange) -> None:
        if self.active is None and not self.queue:
            self.active = exchange
            exchange.start()
        else:
            self.queue.append(exchange)
            self.reading.pause(PIPELINE)

    def exchange_done(self, exchange: Exchange) -> None:
        """The active exchange has ended: the next request's turn, or the end."""
        if self.active is exchange:
            self.active = None
        if self.closing:
            return
        if not exchange.keep_alive or self.plane.draining:
            if exchange.body_done and self.parsing is None and exchange.refusal is None:
                self.close()
            else:
                self.linger()
            return
        if self.starting:
            return  # the loop below is running further up the stack
        self.starting = True
        try:
            while self.active is None and self.queue and not self.closing:
                nxt = self.active = self.queue.popleft()
                nxt.start()
        finally:
            self.starting = False
        if self.closing:
            return
        if not self.queue:
            self.reading.resume(PIPELINE)
        if self.active is None and self.parsing is None:
            if self.in_head:
                self._arm(HEADER, self.plane.header_timeout)
            else:
                self._arm(KEEPALIVE, self.plane.keepalive_timeout)

    def _unparsed(self) -> Request:
        """A stand-in request for the log line of one that could not be parsed."""
        try:
            method = self.parser.get_method().decode("ascii", "replace")
        except httptools.HttpParserError:
            method = "-"
        path = self.url.partition(b"?")[0].decode("latin-1") or "-"
        request = Request(method or "-", path, b"", "1.1")
        request.keep_alive = False
        return request

    def _refuse(self, error: GatewayError) -> None:
        """A request that cannot be parsed: answered in its turn, then the connection ends."""
        self.stopped = True
        self.in_head = False
        self._disarm()
        self.reading.pause(PIPELINE)
        if self.closing:
            return
        exchange, self.parsing = self.parsing, None
        if exchange is not None:  # the body is what is malformed: that request is refused
            exchange.keep_alive = False
            if exchange is self.active:
                exchange.fail(error)
            else:
                exchange.refusal = error
            return
        self._enqueue(Exchange(self, self._unparsed(), error))

    def _upgraded(self, rest: bytes) -> None:
        """llhttp stopped at an upgrade: a WebSocket handshake waits for the upstream's 101;
        any other upgrade (h2c) was served as a plain request, so parsing goes on."""
        exchange = self.active if not self.queue else self.queue[-1]
        if exchange is None or exchange.refusal is not None:
            self.stopped = True
            return
        if exchange.request.websocket:
            self.stopped = True
            self.upgrade_rest = rest
            self.reading.pause(PIPELINE)
            return
        self.parser = httptools.HttpRequestParser(self)
        if rest:
            self.data_received(rest)

    # --- writing and ending ---------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not self.closing:
            transport.write(data)

    def close(self) -> None:
        """After the answers written so far."""
        self.closing = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Now, unflushed bytes and all: the peer must see a broken connection."""
        self.closing = True
        self.stopped = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()

    def linger(self) -> None:
        """Answered before the request was read: drop what still comes, then close."""
        self.stopped = True
        self.parsing = None
        self.queue.clear()
        transport = self.transport
        if transport is None:
            return
        if transport.can_write_eof():
            transport.write_eof()  # the client sees the answer end here
        self.reading.blocked = 0
        transport.resume_reading()
        self._arm(LINGER, LINGER_SECONDS)

    def drain(self) -> None:
        """SIGTERM: an idle connection closes now; a busy one after its response."""
        if self.active is None and self.parsing is None and not self.queue:
            self.close()

    def detach(self) -> asyncio.Transport:
        """For a tunnel: the transport leaves this protocol (and the client bytes that
        followed the upgrade request go with it)."""
        self.closing = True
        self.stopped = True
        self._cancel_timer()
        self.plane.connections.discard(self)
        assert self.transport is not None
        return self.transport

    # --- the timer ------------------------------------------------------------------------------

    def _arm(self, kind: int, seconds: float) -> None:
        """Set the connection's deadline. Lazy: a timer due earlier stays and re-arms itself
        when it fires, so a busy keep-alive connection makes no timer per request."""
        self.timer_kind = kind
        due = self.deadline = self.loop.time() + seconds
        timer = self.timer
        if timer is not None:
            if timer.when() <= due:
                return
            timer.cancel()
        self.timer = self.loop.call_at(due, self._expired)

    def _disarm(self) -> None:
        self.timer_kind = 0  # the timer, if any, finds nothing to do when it fires

    def _cancel_timer(self) -> None:
        self.timer_kind = 0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expired(self) -> None:
        self.timer = None
        kind = self.timer_kind
        if not kind:
            return
        now = self.loop.time()
        if kind == BODY_SILENCE:
            if self.parsing is None:
                return
            if self.reading.blocked:  # paused by the gateway: not the client's silence
                self.body_seen = now
            self.deadline = self.body_seen + self.plane.body_timeout
        if now < self.deadline:
            self.timer = self.loop.call_at(self.deadline, self._expired)
            return
        self.timer_kind = 0
        if kind == BODY_SILENCE:
            exchange, self.parsing = self.parsing, None
            if exchange is not None:
                exchange.body_timeout()
            return
        if self.transport is None:
            return
        if kind == HEADER and self.active is not None:
            return  # a head waiting behind a response: its deadline starts after it (below)
        if kind == LINGER:
            self.transport.abort()
            return
        # The header deadline or keep-alive idleness: nothing to answer, the connection ends.
        self.closing = True
        self.transport.close()
