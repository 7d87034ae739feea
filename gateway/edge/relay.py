"""The exchange's upstream half: the request rebuilt and sent, the response relayed back.

The upstream request head is rebuilt from parsed fields: the configured base path plus the
client's path and query, the upstream's Host, the client's end-to-end headers (see
gateway.edge.request), X-Forwarded-*, X-Request-Id and X-User-Id, and framing of the gateway's
own. The response head is rebuilt the same way: hop-by-hop headers out, `Server: pixelcraft`,
X-Request-Id, the RateLimit fields, HSTS on HTTPS, and framing for this client (chunked, a
length, or the connection's end for HTTP/1.0). The response is relayed by the upstream
connection's callbacks, with no await per chunk. A response up to SMALL_RESPONSE bytes with a
Content-Length is collected and written once: one write, and a failure while reading it is still
a clean 502/504. Failures before the response started are problems (502/504); after it started
the client connection is aborted, so a cut-off body can never look complete.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.auth.identity import Client, Identity
from gateway.edge.flow import BODY, PEER
from gateway.edge.request import append_forwarded_for
from gateway.edge.tunnel import Tunnel
from gateway.edge.upstream import UpstreamConnection
from gateway.edge.wire import (
    CHUNKED,
    CLOSE,
    CONNECTION_OPTIONS,
    HOP_BY_HOP,
    KEEP_ALIVE,
    LAST_CHUNK,
    SERVER,
    STATUS_LINES,
    chunk,
)
from gateway.errors import GatewayError, UpstreamTimeout, UpstreamUnavailable
from pixelcraft.contract import anonymous
from pixelcraft.logs import request_id_var

if TYPE_CHECKING:
    from gateway.edge.connection import Connection
    from gateway.edge.plane import DataPlane
    from gateway.edge.request import Request
    from gateway.limiting.decisions import Decision
    from gateway.limiting.usage import UsageWatcher

logger = logging.getLogger(__name__)

SMALL_RESPONSE = 64 * 1024

# How the body reaches the client.
NO_BODY, LENGTH, CHUNKS, UNTIL_CLOSE = 0, 1, 2, 3

# Response headers the gateway sets itself, so the upstream's copies never pass.
_RESPONSE_SET = frozenset((b"server", b"x-request-id"))
_LIMIT_FIELDS = frozenset(
    (b"ratelimit", b"ratelimit-policy", b"x-ratelimit-limit", b"x-ratelimit-remaining",
     b"x-ratelimit-reset")
)  # fmt: skip
_HSTS_FIELD = frozenset((b"strict-transport-security",))
WEBSOCKET_UPGRADE = b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
_IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "PUT", "DELETE"))
_BODYLESS = frozenset((204, 304))

_UPSTREAM_ERRORS = {
    "reset": (UpstreamUnavailable, "the upstream closed the connection before answering"),
    "bad_response": (UpstreamUnavailable, "the upstream sent a response that is not valid HTTP"),
    "idle_timeout": (UpstreamTimeout, "the upstream stopped sending its response"),
}


class Relay:
    """The upstream side of an Exchange (its subclass), and every attribute it has."""

    __slots__ = (
        "aborted",
        "answered",
        "awaiting_body",
        "body",
        "body_done",
        "body_size",
        "buffered",
        "client",
        "conn",
        "decision",
        "finished",
        "framing",
        "head",
        "head_sent",
        "identity",
        "keep_alive",
        "limit_block",
        "plane",
        "refusal",
        "request",
        "request_sent",
        "retry",
        "reuse",
        "rid",
        "route",
        "sent_bytes",
        "small",
        "started",
        "status",
        "streaming",
        "task",
        "upstream",
        "upstream_status",
        "watcher",
    )

    conn: Connection
    plane: DataPlane
    request: Request
    rid: str
    client: Client | None
    identity: Identity | None
    decision: Decision | None
    limit_block: bytes
    task: asyncio.Task[None] | None
    body: list[bytes]
    body_done: bool
    body_size: int
    streaming: bool
    upstream: UpstreamConnection | None
    request_sent: bool
    retry: bytes | None
    reuse: bool
    upstream_status: int
    head: bytes
    head_sent: bool
    framing: int
    small: list[bytes] | None
    sent_bytes: int
    watcher: UsageWatcher | None
    answered: bool
    aborted: str | None
    status: int
    keep_alive: bool
    finished: bool

    # Provided by Exchange.
    def finish(self) -> None: ...
    def fail(self, exc: GatewayError) -> None: ...
    def free_body(self) -> None: ...
    def log(self, level: int, message: str, *args: object) -> None: ...

    # --- the request -------------------------------------------------------------------------

    def upstream_head(self) -> bytes:
        request = self.request
        pool = self.plane.pool
        conn = self.conn
        client = self.client
        identity = self.identity
        assert client is not None and identity is not None
        if client.peer_trusted:  # a trusted proxy in front says what the client used
            proto = request.forwarded_proto or conn.scheme
            host = request.forwarded_host or request.host
            forwarded = append_forwarded_for(request.forwarded_for, conn.peer)
            origin = b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\n" % (
                forwarded.encode("latin-1"),
                proto.encode("latin-1"),
            )
        else:
            host = request.host
            origin = conn.origin
        user = identity.value if identity.kind != "ip" else anonymous(identity.value)
        if self.body_done:
            size = self.body_size
            framing = (
                b"Content-Length: %d\r\n" % size
                if size or request.content_length is not None
                else b""
            )
        elif request.chunked:
            framing = CHUNKED
        else:
            framing = b"Content-Length: %d\r\n" % (request.content_length or 0)
        return b"%s %s%s HTTP/1.1\r\n%s%s%s%sX-Request-Id: %s\r\nX-User-Id: %s\r\n%s%s\r\n" % (
            request.method.encode(),
            pool.base_path,
            request.target,
            pool.host_header,
            request.forward,
            origin,
            b"X-Forwarded-Host: %s\r\n" % host.encode("latin-1") if host is not None else b"",
            self.rid.encode(),
            user.encode(),
            WEBSOCKET_UPGRADE if request.websocket else b"",
            framing,
        )

    def forward(self) -> None:
        """Send the request on an idle upstream connection, else on one to come."""
        head = self.upstream_head()
        upstream = self.plane.pool.take()
        if upstream is None:
            self.task = self.plane.loop.create_task(
                self._connect_then(lambda new: self._send(new, head))
            )
        else:
            self._send(upstream, head)

    async def _connect_then(self, send: Callable[[UpstreamConnection], None]) -> None:
        """A new upstream connection (the pool had no idle one, or the keep-alive race), then
        `send` on it."""
        request_id_var.set(self.rid)
        try:
            upstream = await self._connect()
        except GatewayError as exc:
            self.fail(exc)
            return
        except asyncio.CancelledError:
            return
        if self.finished:  # the client left meanwhile
            upstream.release()
            return
        send(upstream)

    async def _connect(self) -> UpstreamConnection:
        plane = self.plane
        pool = plane.pool
        try:
            async with asyncio.timeout(plane.connect_timeout):
                return await pool.acquire()
        except TimeoutError:
            plane.upstream_error("connect_timeout")
            raise UpstreamTimeout(
                f"could not connect to the upstream within {plane.connect_timeout:g} s"
            ) from None
        except OSError as exc:
            plane.upstream_error("connect")
            logger.warning("cannot connect to the upstream %s:%d: %s", pool.host, pool.port, exc)
            raise UpstreamUnavailable("could not connect to the upstream") from exc

    def _send(self, upstream: UpstreamConnection, head: bytes) -> None:
        plane = self.plane
        self.upstream = upstream
        if not self.conn.writable and upstream.reading is not None:
            upstream.reading.pause(PEER)  # the client is still slow to read
        head_only = self.request.method == "HEAD"
        if self.body_done:
            body = self.body
            data = head + b"".join(body) if body else head
            self.free_body()
            # A reused connection the upstream closed just as it was taken is a keep-alive
            # race, not an answer: the request is sent again once (idempotent methods only).
            self.retry = data if upstream.reused and self.request.method in _IDEMPOTENT else None
            upstream.send(self, data, head_only=head_only)
            self.request_sent = True
            upstream.sent(plane.first_byte_timeout)
            return
        # A large body: what arrived so far, then the rest as it comes.
        data = head
        if self.body:
            joined = b"".join(self.body)
            data += chunk(joined) if self.request.chunked else joined
        self.free_body()
        self.streaming = True
        upstream.send(self, data, head_only=head_only)
        self.conn.reading.resume(BODY)

    def upstream_writing(self, writable: bool) -> None:
        """The upload is faster than the upstream reads: stop reading the client meanwhile."""
        if writable:
            self.conn.reading.resume(PEER)
        else:
            self.conn.reading.pause(PEER)

    def _resend(self, upstream: UpstreamConnection, data: bytes) -> None:
        """The keep-alive race: the same request on another connection, once."""
        self.upstream = upstream
        upstream.send(self, data, head_only=self.request.method == "HEAD")
        upstream.sent(self.plane.first_byte_timeout)

    # --- the response ------------------------------------------------------------------------

    def response_head(self, status: int, headers: list[tuple[bytes, bytes]], reuse: bool) -> None:
        if self.finished:
            return
        self.upstream_status = status
        self.reuse = reuse
        if status > 599:
            self.upstream_failed("bad_response", None)
            return
        request = self.request
        drop = _RESPONSE_SET
        if self.limit_block:
            drop = drop | _LIMIT_FIELDS
        if self.conn.site.tls:
            drop = drop | _HSTS_FIELD
        named: list[bytes] | None = None
        lines: list[bytes] = []
        length: int | None = None
        content_type = b""
        for name, value in headers:
            low = name.lower()
            if low in HOP_BY_HOP:
                if low == b"connection":
                    for token in value.lower().split(b","):
                        token = token.strip()
                        if token and token not in CONNECTION_OPTIONS:
                            named = [] if named is None else named
                            named.append(token)
                continue
            if low in drop:
                continue
            if low == b"content-length":
                length = int(value)
            elif low == b"content-type":
                content_type = value
            lines.append(b"%b: %b\r\n" % (name, value))
        if named is not None:
            gone = set(named)
            lines = [line for line in lines if line.split(b":", 1)[0].lower() not in gone]
        upstream = self.upstream
        assert upstream is not None
        if status == 101:
            if not request.websocket:
                self.upstream_failed("bad_response", None)
                return
            lines.append(WEBSOCKET_UPGRADE)
            self.head = b"".join(lines)  # written once the tunnel is set up
            return
        if request.websocket:
            self.keep_alive = False  # the client's parser is past an upgrade request
        decision = self.decision
        if decision is not None and decision.reservation is not None and status < 400:
            from gateway.limiting.usage import UsageWatcher

            self.watcher = UsageWatcher(content_type.decode("latin-1"))
        if request.method == "HEAD" or status in _BODYLESS:
            self.framing = NO_BODY
        elif length is not None:
            self.framing = LENGTH
            if length <= SMALL_RESPONSE:
                self.small = []
                self.head = b"".join(lines)
                if length:
                    upstream.watch_body(self.plane.read_timeout)
                return
        elif request.version == "1.1":
            self.framing = CHUNKS
            lines.append(CHUNKED)
        else:
            self.framing = UNTIL_CLOSE
            self.keep_alive = False
        self.write_head(status, b"".join(lines))
        if self.framing != NO_BODY:
            upstream.watch_body(self.plane.read_timeout)

    def write_head(self, status: int, lines: bytes, body: bytes = b"") -> None:
        self.head_sent = True
        self.conn.write(b"%s%s%s\r\n%s" % (STATUS_LINES[status], lines, self.common(), body))

    def common(self) -> bytes:
        """What every response of the gateway carries: Server, X-Request-Id, the RateLimit
        fields, HSTS on HTTPS, and how the connection goes on."""
        conn = self.conn
        if not self.keep_alive or conn.plane.draining:
            self.keep_alive = False
            connection = CLOSE
        elif self.request.version == "1.0":
            connection = KEEP_ALIVE
        else:
            connection = b""
        return b"%sX-Request-Id: %s\r\n%s%s%s" % (
            SERVER,
            self.rid.encode(),
            self.limit_block,
            conn.site.hsts,
            connection,
        )

    def response_body(self, data: bytes) -> None:
        if self.finished:
            return
        self.sent_bytes += len(data)
        small = self.small
        if small is not None:
            small.append(data)
            return
        watcher = self.watcher
        if watcher is not None:
            watcher.feed(data)
        if self.framing == CHUNKS:
            self.conn.write(chunk(data))
        else:
            self.conn.write(data)

    def response_end(self) -> None:
        if self.finished or self.upstream_status == 101:
            return
        small = self.small
        if small is not None:
            body = small[0] if len(small) == 1 else b"".join(small)
            if self.watcher is not None:
                self.watcher.feed(body)
            self.small = None
            self.write_head(self.upstream_status, self.head, body)
        elif not self.head_sent:
            self.write_head(self.upstream_status, self.head)
        elif self.framing == CHUNKS:
            self.conn.write(LAST_CHUNK)
        if self.watcher is not None:
            self.watcher.close()
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            if self.reuse and self.request_sent:
                upstream.release()
            else:
                upstream.close()
        self.answered = self.upstream_status < 400 and self.sent_bytes > 0
        self.status = self.upstream_status
        self.finish()

    def upstream_failed(self, kind: str, exc: BaseException | None) -> None:
        """The upstream connection broke, timed out or misbehaved."""
        if self.finished:
            return
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.close()
        if self.head_sent:
            if self.framing == UNTIL_CLOSE and kind == "reset" and exc is None:
                self.answered = self.upstream_status < 400 and self.sent_bytes > 0
                self.status = self.upstream_status
                self.finish()  # the connection's end was the body's end
                return
            self.abort("reset_mid_body" if kind == "reset" else kind)
            return
        plane = self.plane
        retry = self.retry
        if kind == "reset" and retry is not None and upstream is not None and not upstream.received:
            self.retry = None
            self.task = plane.loop.create_task(
                self._connect_then(lambda new: self._resend(new, retry))
            )
            return
        plane.upstream_error(kind)
        pool = plane.pool
        if kind == "first_byte_timeout":
            error: GatewayError = UpstreamTimeout(
                f"the upstream sent no complete response within {plane.first_byte_timeout:g} s"
            )
        else:
            cls, detail = _UPSTREAM_ERRORS.get(kind, _UPSTREAM_ERRORS["reset"])
            error = cls(detail)
        self.log(
            logging.WARNING,
            "upstream %s:%d failed before its response was sent on: %s%s",
            pool.host,
            pool.port,
            kind,
            f" ({exc})" if exc is not None else "",
        )
        self.fail(error)

    def upstream_upgraded(self, rest: bytes) -> None:
        """The upstream's 101: the client gets it, then both connections become a tunnel."""
        upstream = self.upstream
        if self.finished or upstream is None:
            return
        self.upstream = None
        self.write_head(101, self.head)
        self.status = 101
        Tunnel(  # it keeps itself (DataPlane.tunnels) until either side closes
            self,  # type: ignore[arg-type]
            self.conn.detach(),
            upstream.detach(),
            rest,
            self.conn.upgrade_rest,
            self.plane.websocket_idle_timeout,
        )

    def tunnel_closed(self) -> None:
        self.keep_alive = False
        self.finish()

    def abort(self, kind: str) -> None:
        """The response started and cannot be completed: cut the client off, so it cannot
        mistake the part it got for the whole (no last chunk, or fewer bytes than promised)."""
        self.plane.upstream_error(kind)
        self.log(logging.WARNING, "upstream failed mid-body (%s); aborting the client", kind)
        self.aborted = kind
        self.keep_alive = False
        self.status = self.upstream_status
        self.conn.abort()
        self.finish()
