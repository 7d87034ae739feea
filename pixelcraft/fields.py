"""Validators both services' settings use for URLs and comma-separated lists."""

from __future__ import annotations

from urllib.parse import urlsplit


def check_url(value: str, schemes: tuple[str, ...], *, needs_host: bool = True) -> str:
    """Accept only the given schemes (and a host for network ones); the message names them."""
    allowed = ", ".join(f"{s}://" for s in schemes[:-1])
    allowed = f"{allowed} or {schemes[-1]}://" if allowed else f"{schemes[-1]}://"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises ValueError on a malformed port)
    except ValueError:
        raise ValueError("is not a valid URL (check the port)") from None
    if parts.scheme.lower() not in schemes or not value.lower().startswith(f"{parts.scheme}://"):
        raise ValueError(f"must start with {allowed}")
    if needs_host and parts.scheme != "unix" and not parts.hostname:
        raise ValueError("has no host")
    return value


def split_csv(value: object) -> object:
    """`a, b,c` from the environment as a list; other inputs pass through unchanged."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value
