"""What the gateway answers itself on its public ports; everything else is proxied.

Small handlers that take the exchange and return a Reply (or await one): `/healthz`,
`/readyz`, `/openapi.json`, `/docs` and its assets, ACME http-01 challenges. Only GET and HEAD
are served on these paths (others get a 405 with `Allow`). Paths match as sent, byte for byte.
On the HTTP port with TLS on (the redirect site) there are challenges and a 308 to HTTPS for
everything else.
"""

from __future__ import annotations

import asyncio
import html
import inspect
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from redis.exceptions import RedisError

from gateway.errors import BadRequest, GatewayError, MethodNotAllowed
from gateway.tls.acme import CHALLENGE_PATH, CHALLENGE_ROUTE, Challenges, https_location
from pixelcraft.openapi import ASSET_FILES, ASSETS, SWAGGER_PAGE, documented

if TYPE_CHECKING:
    from gateway.edge.exchange import Exchange
    from gateway.edge.request import Request

JSON = b"application/json"
READY_TIMEOUT = 2.0


class Reply(NamedTuple):
    """A response of the gateway's own; `headers` are extra `Name: value` lines."""

    status: int
    body: bytes
    content_type: bytes
    headers: bytes = b""


Handler = Callable[["Exchange"], "Reply | Awaitable[Reply]"]


class NotFound(GatewayError):
    status = 404
    title = "Not Found"


class Route:
    """A handler and its metrics label; `methods` it serves (others get a 405)."""

    __slots__ = ("handler", "is_async", "label", "methods")

    def __init__(self, label: str, handler: Handler, methods: tuple[str, ...] = ("GET", "HEAD")):
        self.label = label
        self.handler = handler
        self.is_async = inspect.iscoroutinefunction(handler)
        self.methods = methods


class Routes:
    """Exact paths first, then prefixes, then the fallback (None: proxy)."""

    def __init__(
        self,
        exact: dict[str, Route],
        prefixes: tuple[tuple[str, Route], ...] = (),
        fallback: Route | None = None,
    ) -> None:
        self.exact = exact
        self.prefixes = prefixes
        self.fallback = fallback
        allow = "GET, HEAD"

        def refuse(exchange: Exchange) -> Reply:
            raise MethodNotAllowed(f"{exchange.request.method} is not served on this path", allow)

        self._refusals = {
            route.label: Route(route.label, refuse, ())
            for route in (*exact.values(), *(r for _, r in prefixes))
        }

    def match(self, request: Request) -> Route | None:
        path = request.path
        route = self.exact.get(path)
        if route is None:
            for prefix, candidate in self.prefixes:
                if path.startswith(prefix) or path == prefix[:-1]:
                    route = candidate
                    break
            else:
                return self.fallback
        if request.method not in route.methods:
            return self._refusals[route.label]
        return route


STATUS = {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}
READY = {
    "type": "object",
    "properties": {
        "status": {"type": "string", "enum": ["ready", "unavailable", "draining"]},
        "redis": {"type": "string", "example": "ok"},
        "upstream": {"type": "string", "example": "ok"},
    },
    "required": ["status"],
}
_OK = Reply(200, b'{"status": "ok"}', JSON)


@documented(
    tags=["operations"],
    summary="Liveness of the gateway",
    description="200 while the gateway process answers. Not rate limited.",
    responses={
        "200": {"description": "Alive.", "content": {"application/json": {"schema": STATUS}}}
    },
)
def healthz(exchange: Exchange) -> Reply:
    """Alive: the process answers (dependencies are /readyz's business)."""
    return _OK


@documented(
    tags=["operations"],
    summary="Readiness of the gateway",
    description="200 when Redis answers PING and the upstream its /healthz; 503 otherwise, and "
    "while draining after SIGTERM. Not rate limited.",
    responses={
        "200": {"description": "Ready.", "content": {"application/json": {"schema": READY}}},
        "503": {"description": "Not ready.", "content": {"application/json": {"schema": READY}}},
    },
)
async def readyz(exchange: Exchange) -> Reply:
    """Ready: not draining, Redis answers PING, the upstream answers its /healthz."""
    plane = exchange.plane
    if plane.draining:
        return Reply(503, b'{"status": "draining"}', JSON)
    checks = {"redis": "ok", "upstream": "ok"}
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await plane.redis.ping()
    except (RedisError, OSError, TimeoutError):
        checks["redis"] = "unreachable"
    checks["upstream"] = await plane.upstream_health(READY_TIMEOUT)
    ready = all(v == "ok" for v in checks.values())
    body = json.dumps({"status": "ready" if ready else "unavailable", **checks}).encode()
    return Reply(200 if ready else 503, body, JSON)


@documented(
    tags=["operations"],
    summary="This document",
    description="The merged OpenAPI 3 document: the gateway's operations and the chat "
    "service's, each annotated with the rate limits in force (`x-ratelimit`).",
    responses={"200": {"description": "OpenAPI 3.0.", "content": {"application/json": {}}}},
)
def openapi(exchange: Exchange) -> Reply:
    """GET /openapi.json: served from memory, never waiting on the upstream."""
    plane = exchange.plane
    limiter = plane.limiter
    document = plane.api_document
    if document is None:
        raise NotFound("the API document is not ready yet")
    return Reply(200, document.render(limiter.policies if limiter is not None else None), JSON)


class Docs:
    """Swagger UI at /docs, its assets read once and kept (no CDN, nothing off-origin)."""

    def __init__(self, title: str) -> None:
        page = SWAGGER_PAGE.format(title=html.escape(title), spec_url=json.dumps("openapi.json"))
        self.page = Reply(200, page.encode(), b"text/html; charset=utf-8")
        self.assets: dict[str, Reply] = {}

    def serve_page(self, exchange: Exchange) -> Reply:
        return self.page

    async def serve_asset(self, exchange: Exchange) -> Reply:
        name = exchange.request.path.rpartition("/")[2]
        reply = self.assets.get(name)
        if reply is None:
            if name not in ASSET_FILES:
                raise NotFound("no such asset")
            body = await asyncio.to_thread((ASSETS / name).read_bytes)
            kind = {"css": b"text/css", "js": b"text/javascript", "png": b"image/png"}
            content_type = kind.get(name.rpartition(".")[2], b"application/octet-stream")
            reply = self.assets[name] = Reply(
                200, body, content_type, b"Cache-Control: public, max-age=86400\r\n"
            )
        return reply


def challenge_route(challenges: Challenges) -> Route:
    async def challenge(exchange: Exchange) -> Reply:
        body = await challenges.read(exchange.request.path)
        if body is None:
            raise NotFound("no such challenge")
        return Reply(200, body, b"text/plain")

    return Route(CHALLENGE_ROUTE, challenge)


def public_routes(title: str, challenges: Challenges | None) -> Routes:
    """The API port's own routes (challenges too while TLS is off: the first certificate)."""
    docs = Docs(title)
    exact = {
        "/healthz": Route("/healthz", healthz),
        "/readyz": Route("/readyz", readyz),
        "/openapi.json": Route("/openapi.json", openapi),
        "/docs": Route("/docs", docs.serve_page),
    }
    prefixes = [("/docs/static/", Route("/docs/static/{name}", docs.serve_asset))]
    if challenges is not None:
        prefixes.append((CHALLENGE_PATH, challenge_route(challenges)))
    return Routes(exact, tuple(prefixes))


def redirect_routes(challenges: Challenges, https_port: int) -> Routes:
    """The HTTP port with TLS on: challenges, and a 308 to HTTPS for everything else (308, not
    301: the method and body are kept, RFC 9110 §15.4.9)."""

    def to_https(exchange: Exchange) -> Reply:
        request = exchange.request
        target = request.target.decode("latin-1")
        location = https_location(request.host, target, https_port)
        if location is None:
            raise BadRequest("a Host header naming this server is required", "Host")
        return Reply(308, b"", b"text/plain", b"Location: %s\r\n" % location.encode())

    return Routes(
        {},
        ((CHALLENGE_PATH, challenge_route(challenges)),),
        Route("redirect to https", to_https),
    )


def operations(routes: Routes) -> list[tuple[str, str, Any]]:
    """(method, path, handler) of every documented route, for the OpenAPI document."""
    return [("get", path, route.handler) for path, route in routes.exact.items()]
