"""The gateway's error tree: library errors become these where they enter, one status each."""

from __future__ import annotations

from typing import Any

from gateway.limiting.policies import DEFAULT_PLAN
from pixelcraft.boot import DependencyUnavailable


class GatewayError(Exception):
    """Base of the errors the gateway answers with a problem body (RFC 9457): `type`,
    `title`, `status`, `detail`, plus the `members` and `headers` a subclass adds."""

    status = 500
    title = "Internal Server Error"
    type = "about:blank"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.members: dict[str, Any] = {}
        self.headers: dict[str, str] = {}
        # (body up to the request id, header lines), rendered at its first answer: a problem
        # kept and answered again (a 429's, see Decision.denial) is encoded once.
        self.rendered: tuple[bytes, bytes] | None = None


class BadHeader(GatewayError):
    """A request header is malformed or repeated; `header` names it."""

    status = 400
    title = "Bad Request"

    def __init__(self, header: str, detail: str) -> None:
        super().__init__(f"{header}: {detail}")
        self.header = header
        self.members["header"] = header


class BadRequest(GatewayError):
    """The request cannot be read as HTTP/1.1 the gateway serves: framing, target, version."""

    status = 400
    title = "Bad Request"

    def __init__(self, detail: str, header: str | None = None) -> None:
        super().__init__(detail)
        if header is not None:
            self.members["header"] = header


class MethodNotAllowed(GatewayError):
    """The method is not served on this path (or at all, for CONNECT); `Allow` says what is."""

    status = 405
    title = "Method Not Allowed"

    def __init__(self, detail: str, allow: str) -> None:
        super().__init__(detail)
        self.headers["Allow"] = allow


class RequestTimeout(GatewayError):
    """The request body went silent for longer than GATEWAY_CLIENT_BODY_TIMEOUT."""

    status = 408
    title = "Request Timeout"


class ExpectationFailed(GatewayError):
    """An `Expect` other than 100-continue (RFC 9110 §10.1.1)."""

    status = 417
    title = "Expectation Failed"


class TargetTooLong(GatewayError):
    """The request target is longer than the gateway accepts."""

    status = 414
    title = "URI Too Long"


class HeadersTooLarge(GatewayError):
    """The request line or the header section is over the gateway's limits."""

    status = 431
    title = "Request Header Fields Too Large"


class Unavailable(GatewayError):
    """503 for now: the client may retry after `retry_after` seconds."""

    status = 503
    title = "Service Unavailable"

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.headers["Retry-After"] = str(retry_after)


class BodyBufferFull(Unavailable):
    """Request bodies held in memory have reached GATEWAY_CLIENT_BODY_BUFFER_TOTAL_BYTES."""


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


class RateLimited(GatewayError):
    """A rate-limit policy has no tokens left for this request."""

    status = 429
    title = "Too Many Requests"
    # draft-ietf-httpapi-ratelimit-headers-10 §6.1
    type = "https://iana.org/assignments/http-problem-types#quota-exceeded"

    def __init__(
        self,
        detail: str,
        violated: list[str],
        retry_after: int,
        plan: str = DEFAULT_PLAN,
        override: bool = False,
    ) -> None:
        super().__init__(detail)
        self.members["violated-policies"] = violated
        self.members["retry_after"] = retry_after
        self.members["plan"] = plan  # whose version of the policy denied: the user's plan
        if override:
            self.members["override"] = True  # an operator's override of it for this user
        self.headers["Retry-After"] = str(retry_after)


class LimiterUnavailable(Unavailable):
    """Redis is unavailable and a policy that applies says failure_mode = "closed"."""


class RedisUnreachable(DependencyUnavailable):
    """Redis did not answer at boot within the retry budget."""
