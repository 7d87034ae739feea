"""Request id and error mapping for the chat service."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from pixelcraft.contract import REQUEST_ID, REQUEST_ID_HEADER
from pixelcraft.logs import request_id_var
from pixelcraft.problems import PROBLEM_JSON, problem
from upstream.errors import DatabaseUnavailable, InvalidFields, UpstreamError

logger = logging.getLogger(__name__)

_OWN_HEADERS = {"content-type", "content-length"}


def error_body(exc: UpstreamError) -> dict[str, Any]:
    """The problem object for one of our errors (also used for SSE `error` events)."""
    extra: dict[str, Any] = {}
    if isinstance(exc, InvalidFields):
        extra["errors"] = exc.errors
    if getattr(exc, "field", None):
        extra["field"] = exc.field  # type: ignore[attr-defined]
    return problem(exc.status, exc.title, exc.detail, request_id_var.get(), extra)


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Keep a well-formed X-Request-Id (the gateway sends one) or make one; echo it."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    rid = given if REQUEST_ID.match(given) else uuid.uuid4().hex
    token = request_id_var.set(rid)
    try:
        response = await handler(request)
        if not response.prepared:
            response.headers[REQUEST_ID_HEADER] = rid
        return response
    except web.HTTPException as exc:
        exc.headers[REQUEST_ID_HEADER] = rid
        raise
    finally:
        request_id_var.reset(token)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Our errors and aiohttp's HTTP errors become problem+json; anything else a logged 500."""
    try:
        return await handler(request)
    except UpstreamError as exc:
        headers = {}
        if isinstance(exc, DatabaseUnavailable):
            headers["Retry-After"] = str(exc.retry_after)
            logger.warning("%s %s: %s", request.method, request.path, exc.detail)
        return web.json_response(
            error_body(exc), status=exc.status, headers=headers, content_type=PROBLEM_JSON
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        body = problem(exc.status, exc.reason, exc.text or exc.reason, request_id_var.get())
        if exc.status == 405:
            body["detail"] = f"{request.method} is not allowed on {request.path}"
        elif exc.status == 404:
            body["detail"] = f"no route for {request.path}"
        keep = {k: v for k, v in exc.headers.items() if k.lower() not in _OWN_HEADERS}
        return web.json_response(body, status=exc.status, headers=keep, content_type=PROBLEM_JSON)
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        body = problem(
            500, "Internal Server Error", "an unexpected error occurred", request_id_var.get()
        )
        return web.json_response(body, status=500, content_type=PROBLEM_JSON)
