"""The forwarding handler: every request the gateway does not own goes to the upstream.

Bodies stream both ways without buffering (a chunk is written to the other side as soon as it
is read). One shared ClientSession with a keep-alive pool. Timeouts are separate: connect
(GATEWAY_UPSTREAM_CONNECT_TIMEOUT, pool wait included), first byte of the response
(GATEWAY_UPSTREAM_FIRST_BYTE_TIMEOUT) and silence between body chunks
(GATEWAY_UPSTREAM_READ_TIMEOUT); there is no total, so a stream that keeps sending is never cut.
Failures before the response are 502/504 problems; after it started, the client connection is
aborted so a truncated body can never look complete. A client that leaves cancels the handler
(handler_cancellation), which closes the upstream request at once.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway import headers as hdrs
from gateway.errors import BodyTooLarge, UpstreamTimeout, UpstreamUnavailable
from gateway.exchange import EXCHANGE, Exchange
from gateway.identity import Client, Identity, client_of, resolve_jwt, resolve_plain
from gateway.metrics import Metrics
from gateway.ratelimit import Limiter
from gateway.settings import GatewaySettings
from gateway.tokens import TokenVerifier
from gateway.usage import UsageWatcher
from gateway.websocket import is_websocket, relay_websocket

logger = logging.getLogger(__name__)

# A chunked request body up to this size is read whole before anything is sent upstream, so
# an oversized one is a 413 with no byte forwarded; past it (only when GATEWAY_MAX_BODY_BYTES is
# larger) it streams and an overflow aborts the upstream request mid-body.
PREFETCH_BYTES = 1 << 20


# An upstream body up to this size with a Content-Length is read whole and sent in one write:
# fewer syscalls and awaits per request, and a failure while reading it is still a clean 502.
SMALL_BODY = 64 * 1024


class _Counted:
    """A chunked body streamed upstream past the prefetch, counted against the limit."""

    __slots__ = ("exceeded", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.exceeded = False

    async def stream(self, head: bytes, rest: aiohttp.StreamReader) -> AsyncIterator[bytes]:
        total = len(head)
        yield head
        async for chunk in rest.iter_any():
            total += len(chunk)
            if total > self.limit:
                self.exceeded = True
                raise BodyTooLarge(f"request body exceeds {self.limit} bytes")
            yield chunk


class Metering:
    """What settling a request's token reservation needs: the upstream's status, and the
    usage report found in the answer (when the request reserved tokens)."""

    __slots__ = ("status", "watch", "watcher")

    def __init__(self, watch: bool) -> None:
        self.watch = watch
        self.status: int | None = None
        self.watcher: UsageWatcher | None = None

    def start(self, upstream: aiohttp.ClientResponse) -> UsageWatcher | None:
        self.status = upstream.status
        if self.watch and upstream.status < 400:
            self.watcher = UsageWatcher(upstream.content_type)
        return self.watcher


class Proxy:
    """Forwarding state shared by all requests: the session, the upstream, the limits."""

    def __init__(self, settings: GatewaySettings, metrics: Metrics) -> None:
        self.base = settings.gateway_upstream_url
        self.max_body = settings.gateway_max_body_bytes
        self.connect_timeout = settings.gateway_upstream_connect_timeout
        self.first_byte_timeout = settings.gateway_upstream_first_byte_timeout
        self.read_timeout = settings.gateway_upstream_read_timeout
        self.pool_size = settings.gateway_upstream_pool_size
        self.trusted = list(settings.gateway_trusted_proxies)
        self.metrics = metrics
        self.verifier: TokenVerifier | None = None
        self.limiter: Limiter | None = None
        self._session: aiohttp.ClientSession | None = None

    def open(self) -> aiohttp.ClientSession:
        """Create the shared session (inside the running loop, from a cleanup context)."""
        connector = aiohttp.TCPConnector(
            limit=self.pool_size,
            limit_per_host=0,
            keepalive_timeout=15,  # below the upstream's own idle timeout (aiohttp: 75 s)
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            # sock_read starts once the request is fully sent, so it bounds the wait for the
            # first byte; after the headers `_idle()` switches it to the idle-read timeout.
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=self.connect_timeout,
                sock_connect=self.connect_timeout,
                sock_read=self.first_byte_timeout,
            ),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        return self._session

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Proxy.open() runs at startup"
        return self._session

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Forward one request and stream the answer back."""
        peer = request.remote or "unknown"
        forwarded = request.headers.getall("X-Forwarded-For", ()) if self.trusted else ()
        client = client_of(peer, forwarded, self.trusted)
        if self.verifier is None:
            identity = resolve_plain(request, client.address)
        else:
            identity = await resolve_jwt(request, client.address, self.verifier)
        exchange = request[EXCHANGE]
        exchange.identity = identity
        exchange.route_path = request.path
        limiter = self.limiter
        decision = None
        if limiter is not None:
            decision = await limiter.check(
                request.method, request.path, identity, client.address, request.content_length
            )
            if decision is not None:
                exchange.limit_headers = hdrs.limit_headers(decision)
                if not decision.allowed:
                    raise decision.denial()
        headers = self.forward_headers(request, exchange.request_id, peer, client, identity)
        url = URL(self.base + request.raw_path, encoded=True)  # the client's bytes, as sent
        if decision is None or (decision.reservation is None and decision.lease is None):
            if is_websocket(request):
                return await relay_websocket(
                    request, self.session, url, headers, self.metrics, exchange.limit_headers
                )
            return await self.forward(request, exchange, url, headers)
        assert limiter is not None
        metering = Metering(decision.reservation is not None)
        try:
            if is_websocket(request):
                return await relay_websocket(
                    request, self.session, url, headers, self.metrics, exchange.limit_headers
                )
            return await self.forward(request, exchange, url, headers, metering)
        finally:
            # The model answered only if a 2xx body reached the client; otherwise (upstream
            # down, error status, client gone before the first byte) nothing was used.
            status = metering.status
            answered = status is not None and status < 400 and bool(exchange.body_bytes)
            used = metering.watcher.tokens if metering.watcher is not None else None
            limiter.finish(decision, used, refund=not answered)

    def forward_headers(
        self, request: web.Request, request_id: str, peer: str, client: Client, identity: Identity
    ) -> CIMultiDict[str]:
        incoming = request.headers
        proto, host = request.scheme, request.host
        forwarded_for = peer
        if client.peer_trusted:  # a trusted proxy in front says what the client used
            proto = incoming.get("X-Forwarded-Proto", proto)
            host = incoming.get("X-Forwarded-Host", host)
            forwarded_for = hdrs.append_forwarded_for(incoming.getall("X-Forwarded-For", []), peer)
        return hdrs.upstream_request_headers(
            incoming,
            forwarded_for=forwarded_for,
            proto=proto,
            host=host,
            request_id=request_id,
            user_id=identity.value if identity.kind != "ip" else f"ip:{identity.value}",
        )

    async def request_body(
        self, request: web.Request
    ) -> tuple[bytes | aiohttp.StreamReader | AsyncIterator[bytes] | None, _Counted | None]:
        """The body to send upstream; 413 before any byte is sent whenever that is knowable."""
        if not request.body_exists:
            return None, None
        length = request.content_length
        if length is not None:
            if length > self.max_body:
                raise BodyTooLarge(
                    f"request body of {length} bytes exceeds the limit of {self.max_body}"
                )
            return request.content, None
        head = bytearray()
        while chunk := await request.content.readany():
            head += chunk
            if len(head) > self.max_body:
                raise BodyTooLarge(f"request body exceeds the limit of {self.max_body} bytes")
            if len(head) > PREFETCH_BYTES:
                counted = _Counted(self.max_body)
                return counted.stream(bytes(head), request.content), counted
        return bytes(head), None

    async def forward(
        self,
        request: web.Request,
        exchange: Exchange,
        url: URL,
        headers: CIMultiDict[str],
        metering: Metering | None = None,
    ) -> web.StreamResponse:
        body, counted = await self.request_body(request)
        response: web.StreamResponse | None = None
        try:
            async with self.session.request(
                request.method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                compress=None,
            ) as upstream:
                reply_headers = hdrs.client_response_headers(
                    upstream.headers, request_id=exchange.request_id
                )
                if exchange.limit_headers is not None:
                    reply_headers.update(exchange.limit_headers)
                watcher = metering.start(upstream) if metering is not None else None
                length = upstream.content_length
                if length is not None and length <= SMALL_BODY and request.method != "HEAD":
                    if not upstream.content.is_eof():  # usually it came with the headers
                        self._idle(upstream)
                    payload = await upstream.read()
                    reply_headers.popall("Content-Length", None)
                    exchange.body_bytes = len(payload)
                    if watcher is not None:
                        watcher.feed(payload)
                        watcher.close()
                    return web.Response(
                        body=payload,
                        status=upstream.status,
                        reason=upstream.reason,
                        headers=reply_headers,
                    )
                self._idle(upstream)
                response = web.StreamResponse(
                    status=upstream.status, reason=upstream.reason, headers=reply_headers
                )
                await response.prepare(request)
                content = upstream.content
                exchange.body_bytes = 0
                if watcher is None:
                    while chunk := await content.readany():
                        exchange.body_bytes += len(chunk)
                        await response.write(chunk)
                else:  # the same, looking for the usage report on the side
                    while chunk := await content.readany():
                        exchange.body_bytes += len(chunk)
                        await response.write(chunk)
                        watcher.feed(chunk)
                    watcher.close()
            await response.write_eof()
            return response
        except ConnectionError as exc:
            # aiohttp's ClientConnectionResetError is both a ConnectionError and a ClientError,
            # so it is told apart here: once our response started, it was the client that left.
            if response is not None:
                exchange.aborted = "client gone"
                return response
            self.metrics.upstream_errors.labels("reset").inc()
            raise UpstreamUnavailable("the upstream closed the connection early") from exc
        except aiohttp.ConnectionTimeoutError as exc:  # before TimeoutError: it is one
            self.metrics.upstream_errors.labels("connect_timeout").inc()
            raise UpstreamTimeout(
                f"could not connect to the upstream within {self.connect_timeout:g} s"
            ) from exc
        except TimeoutError as exc:
            if response is not None:
                return self.abort(request, exchange, response, "idle_timeout")
            self.metrics.upstream_errors.labels("first_byte_timeout").inc()
            raise UpstreamTimeout(
                f"the upstream sent no complete response within {self.first_byte_timeout:g} s"
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            self.metrics.upstream_errors.labels("connect").inc()
            raise UpstreamUnavailable(f"could not connect to the upstream: {exc.strerror}") from exc
        except aiohttp.ClientError as exc:
            if counted is not None and counted.exceeded:
                raise BodyTooLarge(
                    f"request body exceeds the limit of {self.max_body} bytes"
                ) from exc
            if response is None:
                self.metrics.upstream_errors.labels("reset").inc()
                raise UpstreamUnavailable(
                    "the upstream closed the connection before answering"
                ) from exc
            return self.abort(request, exchange, response, "reset_mid_body")

    def _idle(self, upstream: aiohttp.ClientResponse) -> None:
        """From the response headers on, silence is bounded by the idle-read timeout."""
        if upstream.connection is not None and upstream.connection.protocol is not None:
            protocol = upstream.connection.protocol
            protocol.read_timeout = self.read_timeout
            protocol.start_timeout()  # re-arm now with the new value

    def abort(
        self, request: web.Request, exchange: Exchange, response: web.StreamResponse, kind: str
    ) -> web.StreamResponse:
        """The upstream failed mid-body: cut the client off so it cannot mistake the part it
        got for the whole (no final chunk, or fewer bytes than Content-Length)."""
        self.metrics.upstream_errors.labels(kind).inc()
        logger.warning("upstream failed mid-body (%s); aborting the client connection", kind)
        exchange.aborted = kind
        if request.transport is not None:
            request.transport.abort()
        return response
