"""The gateway's error tree: library errors become these where they enter, one status each."""

from __future__ import annotations

from pixelcraft.boot import DependencyUnavailable


class GatewayError(Exception):
    """Base of the errors the gateway answers with a problem body."""

    status = 500
    title = "Internal Server Error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadHeader(GatewayError):
    """A request header is malformed or repeated; `header` names it."""

    status = 400
    title = "Bad Request"

    def __init__(self, header: str, detail: str) -> None:
        super().__init__(f"{header}: {detail}")
        self.header = header


class Unauthorized(GatewayError):
    """The bearer token is invalid or expired (RFC 6750 §3.1 invalid_token)."""

    status = 401
    title = "Unauthorized"


class BodyTooLarge(GatewayError):
    """The request body exceeds GATEWAY_MAX_BODY_BYTES."""

    status = 413
    title = "Content Too Large"


class UpstreamUnavailable(GatewayError):
    """The upstream refused the connection or reset it before answering."""

    status = 502
    title = "Bad Gateway"


class UpstreamTimeout(GatewayError):
    """The upstream did not accept the connection or send its first byte in time."""

    status = 504
    title = "Gateway Timeout"


class RedisUnreachable(DependencyUnavailable):
    """Redis did not answer at boot within the retry budget."""
