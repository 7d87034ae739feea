"""One request, from its parsed head to `finish()`: decide, receive, forward, relay.

A proxied request runs its deciding part as one task, because that part truly awaits (the
token verifier, the limiter's coalesced Redis round trip, the body, the upstream pool), in the
order the edge promises: the declared size (413 before anything else), identity (400/401),
limits (429), then `100 Continue` if the client asked for it, then the body. Bodies up to
GATEWAY_CLIENT_BODY_BUFFER_BYTES are received whole before an upstream connection is taken, so
a slow client never holds one; a larger body takes its connection once that much has arrived
and streams the rest. The task ends once the request is on its way; the response is relayed by
the upstream connection's callbacks, with no await per chunk.

The upstream request head is rebuilt from parsed fields: the configured base path plus the
client's path and query, the upstream's Host, the client's end-to-end headers (gateway.edge.
request), X-Forwarded-*, X-Request-Id and X-User-Id, and framing of the gateway's own. The
response head is rebuilt the same way: hop-by-hop headers out, `Server: pixelcraft`,
X-Request-Id, the RateLimit fields, HSTS on HTTPS, framing for this client (chunked, length,
or the connection's end for HTTP/1.0). A response up to SMALL_RESPONSE bytes with a
Content-Length is collected first and written once: one write, and a failure while reading it
is still a clean 502/504. Failures before the response started are problems (502/504); after,
the client connection is aborted so a cut body can never look complete.

Every way an exchange ends (response complete, problem answered, timeout, either side gone)
goes through `finish()`, exactly once: it settles the limiter, counts the metrics, writes the
access log and hands the connection on.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from gateway import headers as hdrs
from gateway.edge.flow import BODY, PEER
from gateway.edge.request import Request
from gateway.edge.upstream import UpstreamConnection
from gateway.edge.wire import (
    CHUNKED,
    CLIENT_CLOSED,
    CLOSE,
    CONNECTION_OPTIONS,
    CONTINUE,
    HOP_BY_HOP,
    KEEP_ALIVE,
    LAST_CHUNK,
    PROBLEM_JSON,
    SERVER,
    STATUS_LINES,
    chunk,
    header_block,
    printable,
    problem_body,
)
from gateway.errors import (
    BodyBufferFull,
    BodyTooLarge,
    GatewayError,
    RequestTimeout,
    Unauthorized,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.identity import Client, Identity, client_of, resolve_jwt, resolve_plain
from gateway.ratelimit import Decision
from gateway.usage import UsageWatcher
from pixelcraft.logs import request_id_var

if TYPE_CHECKING:
    from gateway.edge.connection import Connection
    from gateway.edge.routes import Reply, Route

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
_WEBSOCKET_UPGRADE = b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
_IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "PUT", "DELETE"))

_UPSTREAM_ERRORS = {
    "reset": (UpstreamUnavailable, "the upstream closed the connection before answering"),
    "bad_response": (UpstreamUnavailable, "the upstream sent a response that is not valid HTTP"),
    "idle_timeout": (UpstreamTimeout, "the upstream stopped sending its response"),
}


class Exchange:
    """One request and its response. `status` is what the access log and metrics record."""

    __slots__ = (
        "aborted",
        "answered",
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
        "tunnel",
        "upstream",
        "upstream_status",
        "waiter",
        "watcher",
    )

    def __init__(
        self, conn: Connection, request: Request, refusal: GatewayError | None = None
    ) -> None:
        self.conn = conn
        plane = self.plane = conn.plane
        self.request = request
        self.refusal = refusal
        given = request.request_id
        self.rid = given if given and plane.request_id_ok(given) else plane.new_id()
        self.started = plane.loop.time()
        self.keep_alive = request.keep_alive and refusal is None
        self.status = 0
        self.identity: Identity | None = None
        self.client: Client | None = None
        self.decision: Decision | None = None
        self.limit_block = b""
        self.route: Route | None = None
        self.task: asyncio.Task[None] | None = None
        self.body: list[bytes] = []
        self.body_size = 0
        self.body_done = not request.has_body
        self.buffered = 0
        self.waiter: asyncio.Future[None] | None = None
        self.streaming = False
        self.upstream: UpstreamConnection | None = None
        self.request_sent = False
        self.retry: bytes | None = None
        self.reuse = False
        self.upstream_status = 0
        self.head_sent = False
        self.framing = NO_BODY
        self.small: list[bytes] | None = None
        self.sent_bytes = 0
        self.watcher: UsageWatcher | None = None
        self.answered = False
        self.aborted: str | None = None
        self.finished = False
        self.tunnel: object | None = None
        self.head = b""  # the response head's upstream lines, while the body is collected

    # --- the start ------------------------------------------------------------------------------

    def start(self) -> None:
        """Its turn on the connection has come."""
        plane = self.plane
        plane.lifecycle.enter()
        if self.refusal is not None:
            self.fail(self.refusal)
            return
        route = self.conn.site.routes.match(self.request)
        if route is None:
            self.task = plane.loop.create_task(self.run())
            return
        self.route = route
        if route.is_async:
            self.task = plane.loop.create_task(self.serve_async(route))
            return
        try:
            reply = route.handler(self)
        except GatewayError as exc:
            self.fail(exc)
        else:
            self.reply(reply)

    async def serve_async(self, route: Route) -> None:
        request_id_var.set(self.rid)
        try:
            reply = await route.handler(self)
        except GatewayError as exc:
            self.fail(exc)
        except asyncio.CancelledError:
            return
        except Exception:
            self.crashed()
        else:
            self.reply(reply)

    async def run(self) -> None:
        """Decide, receive the body, send the request upstream."""
        request_id_var.set(self.rid)
        request = self.request
        plane = self.plane
        try:
            length = request.content_length
            if length is not None and length > plane.max_body:
                raise BodyTooLarge(
                    f"request body of {length} bytes exceeds the limit of {plane.max_body}"
                )
            conn = self.conn
            client = conn.client
            if client is None:  # the peer is a trusted proxy: its X-Forwarded-For says who
                client = client_of(conn.peer, request.forwarded_for, plane.trusted)
            self.client = client
            verifier = plane.verifier
            if verifier is None:
                identity = resolve_plain(request.user_ids, client.address)
            else:
                identity = await resolve_jwt(request.authorization, client.address, verifier)
            self.identity = identity
            limiter = plane.limiter
            if limiter is not None:
                decision = await limiter.check(
                    request.method, request.route_path(), identity, client.address, length
                )
                if decision is not None:
                    self.decision = decision
                    self.limit_block = header_block(hdrs.limit_headers(decision))
                    if not decision.allowed:
                        raise decision.denial()
            if self.finished:
                return
            if not self.body_done:
                if request.expect_continue and not self.body_size:
                    conn.write(CONTINUE)  # RFC 9110 §10.1.1: only once it would be accepted
                if self.buffered < plane.buffer_size:
                    self.waiter = plane.loop.create_future()
                    await self.waiter
            await self.forward(self.upstream_head(client, identity))
        except GatewayError as exc:
            self.fail(exc)
        except asyncio.CancelledError:
            return  # finish() cancelled us: the exchange is already over
        except Exception:
            self.crashed()

    def crashed(self) -> None:
        logger.exception(
            "unhandled error in %s %s", self.request.method, printable(self.request.path)
        )
        self.fail(GatewayError("an unexpected error occurred"))

    # --- the request body -----------------------------------------------------------------------

    def body_received(self, data: bytes) -> None:
        """A piece of the request body (de-chunked) from the client connection."""
        if self.finished:
            return
        size = self.body_size = self.body_size + len(data)
        plane = self.plane
        if size > plane.max_body:
            self.fail(BodyTooLarge(f"request body exceeds the limit of {plane.max_body} bytes"))
            return
        if self.streaming:
            upstream = self.upstream
            if upstream is not None:
                upstream.write(chunk(data) if self.request.chunked else data)
            return
        if self.route is not None:
            return  # the gateway's own routes read no body
        self.body.append(data)
        self.buffered += len(data)
        plane.buffered += len(data)
        if plane.buffered > plane.buffer_total:
            self.fail(
                BodyBufferFull(
                    "the gateway holds as many request bodies as it may "
                    "(GATEWAY_CLIENT_BODY_BUFFER_TOTAL_BYTES); retry shortly",
                    1,
                )
            )
            return
        if self.buffered >= plane.buffer_size:
            self.conn.reading.pause(BODY)  # until the upstream connection is there
            self._wake()

    def body_complete(self) -> None:
        if self.finished:
            return
        self.body_done = True
        if self.streaming:
            upstream = self.upstream
            if upstream is not None:
                if self.request.chunked:
                    upstream.write(LAST_CHUNK)
                self.request_sent = True
                upstream.sent(self.plane.first_byte_timeout)
            return
        self._wake()

    def body_timeout(self) -> None:
        self.fail(
            RequestTimeout(
                f"the request body sent nothing for {self.plane.body_timeout:g} s "
                "(GATEWAY_CLIENT_BODY_TIMEOUT)"
            )
        )

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _free_body(self) -> None:
        if self.buffered:
            self.plane.buffered -= self.buffered
            self.buffered = 0
        self.body = []

    # --- forwarding -----------------------------------------------------------------------------

    def upstream_head(self, client: Client, identity: Identity) -> bytes:
        request = self.request
        plane = self.plane
        pool = plane.pool
        conn = self.conn
        if client.peer_trusted:  # a trusted proxy in front says what the client used
            proto = request.forwarded_proto or conn.scheme
            host = request.forwarded_host or request.host
            forwarded = hdrs.append_forwarded_for(request.forwarded_for, conn.peer)
            origin = b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\n" % (
                forwarded.encode("latin-1"),
                proto.encode("latin-1"),
            )
        else:
            host = request.host
            origin = conn.origin
        user = identity.value if identity.kind != "ip" else f"ip:{identity.value}"
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
        return b"".join(
            (
                b"%s %s%s HTTP/1.1\r\n" % (request.method.encode(), pool.base_path, request.target),
                pool.host_header,
                request.forward,
                origin,
                b"X-Forwarded-Host: %s\r\n" % host.encode("latin-1") if host is not None else b"",
                b"X-Request-Id: %s\r\nX-User-Id: %s\r\n" % (self.rid.encode(), user.encode()),
                _WEBSOCKET_UPGRADE if request.websocket else b"",
                framing,
                b"\r\n",
            )
        )

    async def forward(self, head: bytes) -> None:
        """Take an upstream connection and send the request (all of it, when it is here)."""
        plane = self.plane
        pool = plane.pool
        upstream = pool.take()
        if upstream is None:
            try:
                async with asyncio.timeout(plane.connect_timeout):
                    upstream = await pool.acquire()
            except TimeoutError:
                plane.upstream_error("connect_timeout")
                raise UpstreamTimeout(
                    f"could not connect to the upstream within {plane.connect_timeout:g} s"
                ) from None
            except OSError as exc:
                plane.upstream_error("connect")
                logger.warning(
                    "cannot connect to the upstream %s:%d: %s", pool.host, pool.port, exc
                )
                raise UpstreamUnavailable("could not connect to the upstream") from exc
        if self.finished:  # the client left meanwhile
            upstream.release()
            return
        self.upstream = upstream
        head_only = self.request.method == "HEAD"
        if self.body_done:
            data = head + b"".join(self.body) if self.body else head
            self._free_body()
            # A reused connection the upstream closed just as it was taken is a keep-alive
            # race, not an answer: the request is sent again once (idempotent methods only).
            self.retry = data if upstream.reused and self.request.method in _IDEMPOTENT else None
            upstream.send(self, data, head_only=head_only)
            self.request_sent = True
            upstream.sent(plane.first_byte_timeout)
            return
        # A large body: what arrived so far, then the rest as it comes.
        buffered = self.body
        data = head
        if buffered:
            joined = b"".join(buffered)
            data += chunk(joined) if self.request.chunked else joined
        self._free_body()
        self.streaming = True
        upstream.send(self, data, head_only=head_only)
        self.conn.reading.resume(BODY)

    def upstream_writing(self, writable: bool) -> None:
        """The upload is faster than the upstream reads: stop reading the client meanwhile."""
        if writable:
            self.conn.reading.resume(PEER)
        else:
            self.conn.reading.pause(PEER)

    # --- the response ---------------------------------------------------------------------------

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
            drop_named = set(named)
            lines = [line for line in lines if line.split(b":", 1)[0].lower() not in drop_named]
        if status == 101:
            if not request.websocket:
                self.upstream_failed("bad_response", None)
                return
            lines.append(_WEBSOCKET_UPGRADE)
            self.framing = NO_BODY
            self.small = None
            self.head = b"".join(lines)  # written once the tunnel is set up
            return
        if request.websocket:
            self.keep_alive = False  # the client's parser is past an upgrade request
        decision = self.decision
        if decision is not None and decision.reservation is not None and status < 400:
            self.watcher = UsageWatcher(content_type.decode("latin-1"))
        if request.method == "HEAD" or status in (204, 304):
            self.framing = NO_BODY
        elif length is not None:
            self.framing = LENGTH
            if length <= SMALL_RESPONSE:
                self.small = []
                self.head = b"".join(lines)
                if length:
                    self.upstream.watch_body(self.plane.read_timeout)  # type: ignore[union-attr]
                return
        elif request.version == "1.1":
            self.framing = CHUNKS
            lines.append(CHUNKED)
        else:
            self.framing = UNTIL_CLOSE
            self.keep_alive = False
        self._write_head(status, b"".join(lines))
        if self.framing != NO_BODY:
            self.upstream.watch_body(self.plane.read_timeout)  # type: ignore[union-attr]

    def _write_head(self, status: int, upstream_lines: bytes, body: bytes = b"") -> None:
        self.head_sent = True
        self.conn.write(
            b"".join(
                (
                    STATUS_LINES[status],
                    upstream_lines,
                    self.common_block(),
                    b"\r\n",
                    body,
                )
            )
        )

    def common_block(self) -> bytes:
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
            body = b"".join(small) if len(small) != 1 else small[0]
            if self.watcher is not None:
                self.watcher.feed(body)
            self.small = None
            self._write_head(self.upstream_status, self.head, body)
        elif not self.head_sent:
            self._write_head(self.upstream_status, self.head)
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
                self.upstream_status = self.upstream_status or 200
                self.answered = self.upstream_status < 400 and self.sent_bytes > 0
                self.status = self.upstream_status
                self.finish()  # the connection's end was the body's end
                return
            self.abort("reset_mid_body" if kind == "reset" else kind)
            return
        plane = self.plane
        if (
            kind == "reset"
            and self.retry is not None
            and upstream is not None
            and upstream.received == 0
        ):
            data, self.retry = self.retry, None
            self.task = plane.loop.create_task(self.resend(data))
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
        logger.warning(
            "[%s] upstream %s:%d failed before its response was sent on: %s%s",
            self.rid,
            pool.host,
            pool.port,
            kind,
            f" ({exc})" if exc is not None else "",
        )
        self.fail(error)

    async def resend(self, data: bytes) -> None:
        """The keep-alive race: the same request on another connection, once."""
        try:
            upstream = await self._connect_again()
            if self.finished:
                upstream.release()
                return
            self.upstream = upstream
            upstream.send(self, data, head_only=self.request.method == "HEAD")
            upstream.sent(self.plane.first_byte_timeout)
        except GatewayError as exc:
            self.fail(exc)
        except asyncio.CancelledError:
            return

    async def _connect_again(self) -> UpstreamConnection:
        plane = self.plane
        try:
            async with asyncio.timeout(plane.connect_timeout):
                return await plane.pool.acquire()
        except TimeoutError:
            plane.upstream_error("connect_timeout")
            raise UpstreamTimeout(
                f"could not connect to the upstream within {plane.connect_timeout:g} s"
            ) from None
        except OSError as exc:
            plane.upstream_error("connect")
            raise UpstreamUnavailable("could not connect to the upstream") from exc

    def upstream_upgraded(self, rest: bytes) -> None:
        """The upstream's 101: the client gets it, then both connections become a tunnel."""
        if self.finished or self.upstream is None:
            return
        from gateway.edge.tunnel import Tunnel

        upstream, self.upstream = self.upstream, None
        self._write_head(101, self.head)
        self.status = 101
        self.tunnel = Tunnel(
            self,
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
        logger.warning("[%s] upstream failed mid-body (%s); aborting the client connection",
                       self.rid, kind)  # fmt: skip
        self.aborted = kind
        self.keep_alive = False
        self.status = self.upstream_status
        self.conn.abort()
        self.finish()

    # --- answers of the gateway's own -----------------------------------------------------------

    def reply(self, reply: Reply) -> None:
        """A response the gateway makes itself (its routes, problems)."""
        if self.finished:
            return
        if not self.body_done:
            self.keep_alive = False  # the rest of the body is not read: the connection closes
        body = reply.body
        head = b"%sContent-Type: %s\r\nContent-Length: %d\r\n%s%s" % (
            self.plane.clock.date(),
            reply.content_type,
            len(body),
            reply.headers,
            self.common_block(),
        )
        self.head_sent = True
        self.conn.write(
            b"".join(
                (
                    STATUS_LINES[reply.status],
                    head,
                    b"\r\n",
                    b"" if self.request.method == "HEAD" else body,
                )
            )
        )
        self.status = reply.status
        self.sent_bytes = len(body)
        self.finish()

    def fail(self, exc: GatewayError) -> None:
        """End with a problem for `exc`, or cut the connection if the response started."""
        if self.finished:
            return
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.close()
        if self.head_sent:
            self.abort(type(exc).__name__)
            return
        from gateway.edge.routes import Reply

        extra = dict(exc.headers)
        if isinstance(exc, Unauthorized):
            # RFC 6750 §3: the challenge says what is wrong, never echoing the token.
            extra["WWW-Authenticate"] = (
                f'Bearer realm="pixelcraft", error="invalid_token", '
                f'error_description="{exc.detail}"'
            )
        body = problem_body(exc.status, exc.title, exc.detail, self.rid, exc.members, exc.type)
        self.reply(Reply(exc.status, body, PROBLEM_JSON.encode(), header_block(extra)))

    # --- the end --------------------------------------------------------------------------------

    def client_gone(self) -> None:
        """The client connection closed before the exchange ended."""
        if self.finished:
            return
        self.status = CLIENT_CLOSED
        self.aborted = "client gone"
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.close()  # the upstream request ends now (the chat service cancels)
        self.finish()

    def finish(self) -> None:
        """The one place an exchange ends: settle, count, log, hand the connection on."""
        if self.finished:
            return
        self.finished = True
        plane = self.plane
        task = self.task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        self._wake()
        if self.buffered:
            self._free_body()
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            upstream.close()
        decision = self.decision
        limiter = plane.limiter
        if (
            decision is not None
            and limiter is not None
            and (decision.reservation is not None or decision.lease is not None)
        ):
            # The model answered only if a 2xx body reached the client; otherwise
            # (upstream down, error status, client gone before the first byte) nothing
            # was used.
            watcher = self.watcher
            used = watcher.tokens if watcher is not None else None
            limiter.finish(decision, used, refund=not self.answered)
        status = self.status or 500
        elapsed = plane.loop.time() - self.started
        plane.lifecycle.leave()
        route = self.route
        if route is not None:
            label = route.label
        elif self.refusal is not None:
            label = "unmatched"
        else:
            label = plane.metrics.route(self.request.route_path(), status)
        plane.metrics.observe(self.request.method, label, status, elapsed)
        access_log = plane.access_log
        if access_log is not None:
            identity = self.identity
            access_log.write(
                self.rid,
                self.request.method,
                printable(self.request.path),
                status,
                self.sent_bytes,
                elapsed,
                identity.kind if identity is not None else "-",
                self.aborted,
            )
        self.conn.exchange_done(self)
