"""A request head as llhttp parsed it, checked and read in one pass.

llhttp (strict, no leniencies) has already refused what it cannot frame: CL with TE, duplicate
or list Content-Length, a Transfer-Encoding whose last coding is not chunked, obs-fold, bare LF,
whitespace before a colon, bad chunk sizes, control characters in the target or a header. What
it accepts and HTTP/1.1 still forbids, or the gateway does not serve, is refused here, each with
a 400 that says why: a missing or repeated Host (RFC 9112 §3.2), Transfer-Encoding in HTTP/1.0
(§6.1), transfer codings other than chunked, HTTP versions other than 1.0 and 1.1, the
asterisk-form and targets that are neither origin- nor absolute-form (§3.2). CONNECT is a 405.

The same pass builds the block of header lines forwarded upstream: the client's end-to-end
headers minus hop-by-hop ones (and those `Connection` names), minus what the gateway sets
itself (Host, X-Forwarded-*, X-Request-Id, X-User-Id, X-User-Plan, the body's framing, Expect),
minus what
must never pass: `Proxy-Authorization`, names containing `_` (nginx's `underscores_in_headers
off`: `X_User_Id` must not become `X-User-Id` in a CGI-style upstream) and, unless the peer is
a trusted proxy, `Forwarded` and `X-Real-IP`.
"""

from __future__ import annotations

from urllib.parse import unquote

import httptools

from gateway.edge.wire import CONNECTION_OPTIONS, HOP_BY_HOP
from gateway.errors import BadRequest, ExpectationFailed, MethodNotAllowed

ALLOW = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"

# What the one pass does with each header the gateway reads (lower-case names).
_HOST, _LENGTH, _TE, _CONNECTION, _UPGRADE, _EXPECT = 1, 2, 3, 4, 5, 6
_USER, _AUTH, _RID, _XFF, _XFPROTO, _XFHOST, _DROP, _PEER_TRUST = 7, 8, 9, 10, 11, 12, 13, 14
_PLAN = 15
_SPECIAL = {
    b"host": _HOST,
    b"content-length": _LENGTH,
    b"transfer-encoding": _TE,
    b"connection": _CONNECTION,
    b"upgrade": _UPGRADE,
    b"expect": _EXPECT,
    b"x-user-id": _USER,
    b"x-user-plan": _PLAN,
    b"authorization": _AUTH,
    b"x-request-id": _RID,
    b"x-forwarded-for": _XFF,
    b"x-forwarded-proto": _XFPROTO,
    b"x-forwarded-host": _XFHOST,
    b"proxy-authorization": _DROP,
    b"forwarded": _PEER_TRUST,
    b"x-real-ip": _PEER_TRUST,
}
for _name in HOP_BY_HOP - {b"connection", b"transfer-encoding", b"upgrade"}:
    _SPECIAL[_name] = _DROP


class Request:
    """One request head. `path` is the target's path as sent (percent-encoded), `query` the
    bytes after `?`; `forward` the header lines for the upstream."""

    __slots__ = (
        "authorization",
        "chunked",
        "content_length",
        "expect_continue",
        "forward",
        "forwarded_for",
        "forwarded_host",
        "forwarded_proto",
        "host",
        "keep_alive",
        "method",
        "path",
        "query",
        "request_id",
        "user_ids",
        "user_plans",
        "version",
        "websocket",
    )

    def __init__(self, method: str, path: str, query: bytes, version: str) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.version = version
        self.keep_alive = True
        self.host: str | None = None
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.websocket = False
        self.user_ids: list[str] = []
        self.user_plans: list[str] = []
        self.authorization: list[str] = []
        self.request_id: str | None = None
        self.forwarded_for: list[str] = []
        self.forwarded_proto: str | None = None
        self.forwarded_host: str | None = None
        self.forward = b""

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    @property
    def target(self) -> bytes:
        """The origin-form target for the upstream: path and query as the client sent them."""
        if self.query:
            return b"%s?%s" % (self.path.encode(), self.query)
        return self.path.encode()

    def route_path(self) -> str:
        """The path as the upstream's router will see it: percent-decoded (so `/v1/%63hat`
        is `/v1/chat` for the limiter's rules and the metrics' labels too)."""
        path = self.path
        return unquote(path) if "%" in path else path


def _target(method: str, url: bytes) -> tuple[str, bytes, str | None]:
    """(path, query, authority) of a request target (RFC 9112 §3.2); BadRequest otherwise."""
    if url[:1] == b"/":
        path, _, query = url.partition(b"?")
        query = query.partition(b"#")[0]
        return path.partition(b"#")[0].decode("ascii"), query, None
    if url == b"*":
        raise BadRequest(f"the asterisk-form target (`{method} *`) is not served")
    lowered = url[:8].lower()
    if lowered.startswith((b"http://", b"https://")):
        # Absolute form (a proxy's form): answered like its origin form. The authority stands
        # in for Host (§3.2.2) and never decides where the gateway connects.
        try:
            parsed = httptools.parse_url(url)
        except httptools.HttpParserInvalidURLError:
            raise BadRequest("the request target is not a valid absolute URI") from None
        if not parsed.host:
            raise BadRequest("the absolute-form request target has no host")
        authority = parsed.host.decode("ascii")
        if parsed.port is not None:
            authority = f"{authority}:{parsed.port}"
        return parsed.path.decode("ascii") if parsed.path else "/", parsed.query or b"", authority
    raise BadRequest("the request target must be a path or an absolute http(s) URI")


def parse_head(
    method: bytes,
    url: bytes,
    version: str,
    keep_alive: bool,
    upgrade: bool,
    headers: list[tuple[bytes, bytes]],
    peer_trusted: bool,
) -> Request:
    """The checked request; BadRequest (or MethodNotAllowed, ExpectationFailed) otherwise."""
    verb = method.decode("ascii")
    if verb == "CONNECT":
        raise MethodNotAllowed("CONNECT is not served: this gateway is not a forward proxy", ALLOW)
    if version != "1.1" and version != "1.0":
        raise BadRequest(f"HTTP/{version} is not served: use HTTP/1.1 or HTTP/1.0")
    path, query, authority = _target(verb, url)
    request = Request(verb, path, query, version)
    request.keep_alive = keep_alive
    forward: list[bytes] = []
    hosts = 0
    named: list[bytes] | None = None  # headers that `Connection` names, to remove
    upgrade_to = b""
    for name, value in headers:
        low = name.lower()
        kind = _SPECIAL.get(low)
        if kind is None:
            if b"_" not in name:
                forward.append(b"%b: %b\r\n" % (name, value))
            continue
        if kind == _HOST:
            hosts += 1
            request.host = value.decode("latin-1")
        elif kind == _LENGTH:
            request.content_length = int(value)  # llhttp checked: digits only, one value
        elif kind == _TE:
            if version == "1.0":
                raise BadRequest("Transfer-Encoding in an HTTP/1.0 request", "Transfer-Encoding")
            if value.strip().lower() != b"chunked":
                raise BadRequest(
                    "only the chunked transfer coding is supported", "Transfer-Encoding"
                )
            request.chunked = True
        elif kind == _CONNECTION:
            for token in value.lower().split(b","):
                token = token.strip()
                if token and token not in CONNECTION_OPTIONS:
                    named = [] if named is None else named
                    named.append(token)
        elif kind == _UPGRADE:
            upgrade_to = value.strip().lower()
        elif kind == _EXPECT:
            if value.strip().lower() != b"100-continue":
                raise ExpectationFailed("Expect: only 100-continue is supported")
            request.expect_continue = True
        elif kind == _USER:
            request.user_ids.append(value.decode("latin-1"))
        elif kind == _PLAN:
            request.user_plans.append(value.decode("latin-1"))
        elif kind == _AUTH:
            request.authorization.append(value.decode("latin-1"))
            forward.append(b"%b: %b\r\n" % (name, value))
        elif kind == _RID:
            request.request_id = value.decode("latin-1")
        elif kind == _XFF:
            request.forwarded_for.append(value.decode("latin-1"))
        elif kind == _XFPROTO:
            request.forwarded_proto = value.decode("latin-1")
        elif kind == _XFHOST:
            request.forwarded_host = value.decode("latin-1")
        elif kind == _PEER_TRUST and peer_trusted:
            forward.append(b"%b: %b\r\n" % (name, value))
    if authority is not None:
        request.host = authority
    elif hosts > 1:
        raise BadRequest("Host sent more than once", "Host")
    elif hosts == 0 and version == "1.1":
        raise BadRequest("an HTTP/1.1 request needs a Host header", "Host")
    if upgrade:
        # llhttp calls a request with `Upgrade` named in `Connection` an upgrade: only a
        # WebSocket handshake without a body is one here. Any other (h2c) is served as a plain
        # request, its Upgrade removed like any hop-by-hop header.
        if request.has_body:
            raise BadRequest("a protocol upgrade request cannot carry a body", "Upgrade")
        request.websocket = verb == "GET" and upgrade_to == b"websocket"
    if named is not None:
        # Rare: the client named its own hop-by-hop headers. Drop them by name.
        drop = set(named)
        forward = [line for line in forward if line.split(b":", 1)[0].lower() not in drop]
    request.forward = b"".join(forward)
    return request


def append_forwarded_for(existing: list[str], peer: str) -> str:
    """X-Forwarded-For from a trusted proxy, with that proxy appended.

    From anyone else the incoming chain is unverifiable and the upstream gets only the peer, so
    it never sees a client's invented hops.
    """
    if existing:
        return f"{', '.join(v.strip() for v in existing)}, {peer}"
    return peer
