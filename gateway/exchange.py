"""What the edge middleware and the handlers learn about one request, in one slotted object.

One request-storage lookup per request instead of one per field (aiohttp's `request.get` goes
through the generic Mapping code, measurably slow on the hot path).
"""

from __future__ import annotations

from aiohttp import web

from gateway.identity import Identity


class Exchange:
    """Per-request facts for metrics and the access log."""

    __slots__ = ("aborted", "body_bytes", "identity", "limit_headers", "request_id", "route_path")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.identity: Identity | None = None
        self.route_path: str | None = None  # set when proxied: the route label comes from it
        self.body_bytes: int | None = None
        self.aborted: str | None = None
        self.limit_headers: dict[str, str] | None = None  # RateLimit*, for every response


EXCHANGE = web.RequestKey("exchange", Exchange)
