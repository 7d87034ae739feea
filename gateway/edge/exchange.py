"""One request, from its parsed head to `finish()`.

Deciding comes first, in the order the edge promises: the declared size (413 before anything
else), identity (400/401), limits (429); then `100 Continue` if the client asked for it; then
the body. Bodies up to GATEWAY_CLIENT_BODY_BUFFER_BYTES are received whole before an upstream
connection is taken, so a slow client never holds one; a larger body takes its connection once
that much has arrived and streams the rest. The upstream half (gateway.edge.relay) then sends
the request and relays the response.

No task per request where nothing truly waits: identity from X-User-Id is synchronous, the
limiter's coalesced round trip ends in a callback (Limiter.check_soon), an idle pooled
connection is taken at once. A task is made only to wait for a token key set, for a new
upstream connection, or for a handler of the gateway's own that does I/O.

Every way an exchange ends (response complete, problem answered, timeout, either side gone)
goes through `finish()`, exactly once: it settles the limiter, counts the metrics, writes the
access log and hands the connection on.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from gateway.auth.identity import Client, Identity, client_of, resolve_jwt, resolve_plain
from gateway.edge.flow import BODY
from gateway.edge.relay import Relay
from gateway.edge.request import Request
from gateway.edge.routes import Reply
from gateway.edge.upstream import UpstreamConnection
from gateway.edge.wire import (
    CLIENT_CLOSED,
    CONTINUE,
    LAST_CHUNK,
    STATUS_LINES,
    chunk,
    header_block,
    printable,
)
from gateway.errors import (
    BodyBufferFull,
    BodyTooLarge,
    GatewayError,
    RequestTimeout,
    Unauthorized,
)
from gateway.limiting.decisions import Decision
from gateway.limiting.headers import limit_block
from gateway.limiting.policies import DEFAULT_PLAN
from gateway.limiting.usage import UsageWatcher
from gateway.metrics import OTHER
from pixelcraft.logs import request_id_var
from pixelcraft.problems import PROBLEM_JSON, render

if TYPE_CHECKING:
    from gateway.edge.connection import Connection
    from gateway.edge.routes import Route

logger = logging.getLogger(__name__)

_PROBLEM = PROBLEM_JSON.encode()


def problem_head(exc: GatewayError) -> bytes:
    """The RFC 9457 body for `exc` up to its request id (ending `"request_id": `): the id is
    appended per response. (Request ids are of a safe alphabet: no JSON escaping needed.)"""
    body = render(exc.status, exc.title, exc.detail, "", exc.members, exc.type)
    return body[: body.rindex(b'""')]


class Exchange(Relay):
    """One request and its response. `status` is what the access log and metrics record."""

    __slots__ = ()  # every attribute is declared (and slotted) on Relay

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
        self.awaiting_body = False
        self.streaming = False
        self.upstream: UpstreamConnection | None = None
        self.request_sent = False
        self.retry: bytes | None = None
        self.reuse = False
        self.upstream_status = 0
        self.head = b""  # the response head's upstream lines, while its body is collected
        self.head_sent = False
        self.framing = 0
        self.small: list[bytes] | None = None
        self.sent_bytes = 0
        self.watcher: UsageWatcher | None = None
        self.answered = False
        self.aborted: str | None = None
        self.finished = False

    # --- deciding ------------------------------------------------------------------------------

    def start(self) -> None:
        """Its turn on the connection has come."""
        self.plane.lifecycle.enter()
        try:
            if self.refusal is not None:
                self.fail(self.refusal)
                return
            route = self.conn.site.routes.match(self.request)
            if route is None:
                self.identify()
                return
            self.route = route
            if route.is_async:
                self.task = self.plane.loop.create_task(self._serve_async(route))
                return
            self.reply(route.handler(self))  # type: ignore[arg-type]
        except GatewayError as exc:
            self.fail(exc)
        except Exception:
            self.crashed()

    async def _serve_async(self, route: Route) -> None:
        request_id_var.set(self.rid)
        try:
            reply = await route.handler(self)  # type: ignore[misc]
        except GatewayError as exc:
            self.fail(exc)
        except asyncio.CancelledError:
            return
        except Exception:
            self.crashed()
        else:
            self.reply(reply)

    def identify(self) -> None:
        """The size, the client, its identity; then the limits."""
        request = self.request
        plane = self.plane
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
        if plane.verifier is not None:
            self.task = plane.loop.create_task(self._identify_by_token())
            return
        try:
            self.identity = self._by_header(Identity("ip", client.address))
        except GatewayError as exc:
            self.refused(exc)
            return
        self.limit()

    def _by_header(self, anonymous: Identity) -> Identity:
        """X-User-Id, where it may be believed (GATEWAY_USER_ID_HEADER): from `any` peer, from
        a `trusted` one only (an authenticating proxy in front set it), or `off`. A header that
        is not believed is ignored, not an error: the client is its address."""
        mode = self.plane.user_header
        if mode == "any" or (mode == "trusted" and self.conn.peer_trusted):
            request = self.request
            return resolve_plain(request.user_ids, anonymous.value, request.user_plans)
        return anonymous

    async def _identify_by_token(self) -> None:
        request_id_var.set(self.rid)
        verifier = self.plane.verifier
        assert verifier is not None and self.client is not None
        try:
            identity = await resolve_jwt(
                self.request.authorization, self.client.address, verifier, self.plane.plan_claim
            )
            self.identity = self._by_header(identity) if identity.kind == "ip" else identity
        except GatewayError as exc:
            self.task = None
            self.refused(exc)
            return
        except asyncio.CancelledError:
            return
        self.task = None
        self.limit()

    def refused(self, error: GatewayError) -> None:
        """Refused for its identity (400, 401): the request still takes from its address's
        `[ip]` bucket, so a flood of bad tokens or ids meets 429s like any other flood."""
        limiter = self.plane.limiter
        if limiter is None or self.client is None:
            self.fail(error)
            return

        def decided(decision: Decision | None, trouble: GatewayError | None) -> None:
            if not self.finished and self.admitted(decision):
                self.fail(error)  # the limiter unavailable (closed) does not hide why

        limiter.check_address_soon(self.client.address, decided)

    def limit(self) -> None:
        limiter = self.plane.limiter
        if limiter is None:
            self.decided(None, None)
            return
        request = self.request
        assert self.identity is not None and self.client is not None
        limiter.check_soon(
            request.method,
            request.route_path(),
            self.identity,
            self.client.address,
            request.content_length,
            self.decided,
        )

    def decided(self, decision: Decision | None, error: GatewayError | None) -> None:
        """The limiter's answer (None: no policy applies)."""
        if self.finished:  # the client left while the limiter was asked
            limiter = self.plane.limiter
            if decision is not None and limiter is not None:
                limiter.finish(decision, None, refund=True)
            return
        try:
            if error is not None:
                raise error
            if not self.admitted(decision):
                return
            if not self.body_done:
                if self.request.expect_continue and not self.body_size:
                    self.conn.write(CONTINUE)  # RFC 9110 §10.1.1: only once it would be taken
                if self.buffered < self.plane.buffer_size:
                    self.awaiting_body = True  # body_received / body_complete go on
                    return
            self.forward()
        except GatewayError as exc:
            self.fail(exc)
        except Exception:
            self.crashed()

    def admitted(self, decision: Decision | None) -> bool:
        """Keep the limiter's decision (its RateLimit fields go on every answer); a denial is
        answered here (a 429 problem, not raised: denials are shared, see Decision.denial)."""
        if decision is None:
            return True
        self.decision = decision
        self.limit_block = limit_block(decision)
        if not decision.allowed:
            self.fail(decision.denial())
            return False
        return True

    def crashed(self) -> None:
        self.log(
            logging.ERROR,
            "unhandled error in %s %s",
            self.request.method,
            printable(self.request.path),
            exc_info=True,
        )
        self.fail(GatewayError("an unexpected error occurred"))

    # --- the request body ---------------------------------------------------------------------

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
            self.body_ready()

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
        self.body_ready()

    def body_ready(self) -> None:
        """All of the body, or as much as is buffered, is here."""
        if self.awaiting_body:
            self.awaiting_body = False
            try:
                self.forward()
            except GatewayError as exc:
                self.fail(exc)
            except Exception:
                self.crashed()

    def body_timeout(self) -> None:
        self.fail(
            RequestTimeout(
                f"the request body sent nothing for {self.plane.body_timeout:g} s "
                "(GATEWAY_CLIENT_BODY_TIMEOUT)"
            )
        )

    def free_body(self) -> None:
        if self.buffered:
            self.plane.buffered -= self.buffered
            self.buffered = 0
        self.body = []

    # --- answers of the gateway's own --------------------------------------------------------

    def reply(self, reply: Reply) -> None:
        """A response the gateway makes itself (its routes, problems)."""
        if self.finished:
            return
        if not self.body_done:
            self.keep_alive = False  # the rest of the body is not read: the connection closes
        body = reply.body
        self.head_sent = True
        self.conn.write(
            b"%s%sContent-Type: %s\r\nContent-Length: %d\r\n%s%s\r\n%s"
            % (
                STATUS_LINES[reply.status],
                self.plane.clock.date(),
                reply.content_type,
                len(body),
                reply.headers,
                self.common(),
                b"" if self.request.method == "HEAD" else body,
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
        if self.head_sent:  # too late for a status: the client must see a broken response
            self.aborted = exc.title.lower()
            self.keep_alive = False
            self.status = self.upstream_status or exc.status
            self.conn.abort()
            self.finish()
            return
        rendered = exc.rendered
        if rendered is None:
            extra = header_block(exc.headers) if exc.headers else b""
            if isinstance(exc, Unauthorized):
                # RFC 6750 §3: the challenge says what is wrong, never echoing the token.
                extra += (
                    f'WWW-Authenticate: Bearer realm="pixelcraft", error="invalid_token", '
                    f'error_description="{exc.detail}"\r\n'
                ).encode()
            rendered = exc.rendered = (problem_head(exc), extra)
        head, extra = rendered
        body = b'%s"%s"}' % (head, self.rid.encode())
        self.reply(Reply(exc.status, body, _PROBLEM, extra))

    # --- the end ------------------------------------------------------------------------------

    def client_gone(self) -> None:
        """The client connection closed before the exchange ended."""
        if self.finished:
            return
        self.status = CLIENT_CLOSED
        self.aborted = "client gone"
        self.finish()  # closes the upstream connection: the upstream request ends now

    def log(self, level: int, message: str, *args: object, exc_info: bool = False) -> None:
        """A log line about this request, with its id (callbacks run outside its context)."""
        token = request_id_var.set(self.rid)
        try:
            logger.log(level, message, *args, exc_info=exc_info)
        finally:
            request_id_var.reset(token)

    def finish(self) -> None:
        """The one place an exchange ends: settle, count, log, hand the connection on."""
        if self.finished:
            return
        self.finished = True
        plane = self.plane
        task = self.task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        if self.buffered:
            self.free_body()
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
            # The model answered only if a 2xx body reached the client; otherwise (upstream
            # down, error status, client gone before the first byte) nothing was used.
            watcher = self.watcher
            used = watcher.tokens if watcher is not None else None
            limiter.finish(decision, used, refund=not self.answered)
        status = self.status or 500
        elapsed = plane.loop.time() - self.started
        plane.lifecycle.leave()
        request = self.request
        route = self.route
        if route is not None:
            label = route.label
        elif self.refusal is not None:
            label = OTHER
        else:
            label = plane.metrics.route(request.route_path())
        plane.metrics.observe(request.method, label, status, elapsed)
        access_log = plane.access_log
        if access_log is not None:
            identity = self.identity
            limiter = plane.limiter
            plan = (
                limiter.plan_of(identity)
                if limiter is not None and identity is not None
                else DEFAULT_PLAN
            )
            access_log.write(
                self.rid,
                request.method,
                printable(request.path),
                status,
                self.sent_bytes,
                elapsed,
                identity.kind if identity is not None else "-",
                self.aborted,
                plan,
            )
        self.conn.exchange_done(self)
