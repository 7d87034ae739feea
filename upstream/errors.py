"""The upstream's error tree: each maps to one HTTP status in the error middleware."""

from __future__ import annotations


class UpstreamError(Exception):
    """Base of every error the chat service answers with a problem body."""

    status = 500
    title = "Internal Server Error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadRequest(UpstreamError):
    """The request is malformed; `field` names the header, query or body field at fault."""

    status = 400
    title = "Bad Request"

    def __init__(self, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.field = field


class InvalidFields(BadRequest):
    """Schema validation failed; `errors` maps each field to its messages."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        detail = "; ".join(f"{name}: {' '.join(msgs)}" for name, msgs in errors.items())
        super().__init__(detail, field=next(iter(errors), None))
        self.errors = errors


class NotFound(UpstreamError):
    """No such resource for this user (another user's conversation included)."""

    status = 404
    title = "Not Found"


class DatabaseUnavailable(UpstreamError):
    """PostgreSQL is down or the pool is exhausted; retry after `retry_after` seconds."""

    status = 503
    title = "Service Unavailable"

    def __init__(self, detail: str, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class LLMError(UpstreamError):
    """The model provider failed."""


class LLMUnavailable(LLMError):
    """The model provider refused, reset or answered with an error."""

    status = 502
    title = "Bad Gateway"


class LLMTimeout(LLMError):
    """The model provider did not connect or answer in time."""

    status = 504
    title = "Gateway Timeout"
