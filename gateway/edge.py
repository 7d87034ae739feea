"""The one middleware every request passes: request id, errors as problems, metrics, access log.

Kept to a single middleware on purpose: each aiohttp middleware layer costs a coroutine frame on
the hot path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler, Middleware

from gateway.errors import BadHeader, GatewayError, Unauthorized
from gateway.headers import SERVER
from gateway.lifecycle import Lifecycle
from gateway.metrics import Metrics
from gateway.proxy import ABORTED, IDENTITY, REQUEST_ID, ROUTE_PATH
from pixelcraft.logs import request_id_var

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("gateway.access")

REQUEST_ID_FORMAT = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
PROBLEM_JSON = "application/problem+json"
CLIENT_CLOSED = 499  # nginx's code for "client closed the request"


def problem(status: int, title: str, detail: str, request_id: str, **extra: Any) -> web.Response:
    """An RFC 9457 problem response."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    body.update(extra)
    body["request_id"] = request_id
    response = web.Response(
        body=json.dumps(body).encode(), status=status, content_type=PROBLEM_JSON
    )
    response.headers["X-Request-Id"] = request_id
    return response


def error_response(exc: GatewayError, request_id: str) -> web.Response:
    extra: dict[str, Any] = {}
    if isinstance(exc, BadHeader):
        extra["header"] = exc.header
    response = problem(exc.status, exc.title, exc.detail, request_id, **extra)
    if isinstance(exc, Unauthorized):
        # RFC 6750 §3: the challenge says what is wrong, never echoing the token.
        response.headers["WWW-Authenticate"] = (
            f'Bearer realm="pixelcraft", error="invalid_token", error_description="{exc.detail}"'
        )
    return response


def make_edge_middleware(lifecycle: Lifecycle, metrics: Metrics, access_log: bool) -> Middleware:
    """The edge middleware, with its collaborators bound once instead of looked up per request."""

    @web.middleware
    async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("X-Request-Id")
        rid = given if given and REQUEST_ID_FORMAT.match(given) else uuid.uuid4().hex
        request[REQUEST_ID] = rid
        token = request_id_var.set(rid)
        loop = asyncio.get_running_loop()
        started = loop.time()
        lifecycle.enter()
        metrics.inflight.inc()
        response: web.StreamResponse | None = None
        status = 500
        try:
            try:
                response = await handler(request)
            except GatewayError as exc:
                response = error_response(exc, rid)
            except web.HTTPException as exc:
                response = problem(exc.status, exc.reason, exc.text or exc.reason, rid)
            except asyncio.CancelledError:
                status = CLIENT_CLOSED
                raise
            except Exception:
                logger.exception("unhandled error in %s %s", request.method, request.path)
                response = problem(
                    500, "Internal Server Error", "an unexpected error occurred", rid
                )
            if not response.prepared:
                response.headers["Server"] = SERVER
                response.headers["X-Request-Id"] = rid
                if lifecycle.draining:
                    response.force_close()  # answers `Connection: close` while draining
            status = response.status
            return response
        finally:
            elapsed = loop.time() - started
            lifecycle.leave()
            metrics.inflight.dec()
            path = request.get(ROUTE_PATH)
            if path is not None:
                route = metrics.route(path, status)
            else:
                info = request.match_info.route.resource
                route = info.canonical if info is not None else "unmatched"
            metrics.requests.labels(request.method, route, str(status)).inc()
            metrics.duration.labels(route).observe(elapsed)
            if status == CLIENT_CLOSED and access_log:  # aiohttp logs every other outcome
                log_access(access_logger, request, status, 0, elapsed)
            request_id_var.reset(token)

    return edge


class AccessLogger(AbstractAccessLogger):
    """One line per response, written after it was sent (so size and time are final).

    Identity kind, never its value; the path without the query string, which may carry tokens.
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        log_access(self.logger, request, response.status, response.body_length, time)


def log_access(
    log: logging.Logger, request: web.BaseRequest, status: int, size: int, elapsed: float
) -> None:
    identity = request.get(IDENTITY)
    kind = identity.kind if identity is not None else "-"
    aborted = request.get(ABORTED)
    fields: dict[str, Any] = {
        "method": request.method,
        "path": request.path,
        "status": status,
        "bytes": size,
        "duration_ms": round(elapsed * 1000, 3),
        "identity": kind,
    }
    if aborted:
        fields["aborted"] = aborted
    log.info(
        "%s %s %d %d %.1fms id=%s%s",
        request.method,
        request.path,
        status,
        size,
        elapsed * 1000,
        kind,
        f" aborted={aborted}" if aborted else "",
        extra={"access": fields},
    )
