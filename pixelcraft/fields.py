"""Validators both services' settings use for URLs, hosts and comma-separated lists."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator


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


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_HOSTNAME = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?$")


def check_host(value: str) -> str:
    """An address to listen on: an IP address or a host name, not a URL or host:port."""
    try:
        ipaddress.ip_address(value.strip("[]"))
        return value.strip("[]")
    except ValueError:
        pass
    if len(value) > 253 or not _HOSTNAME.match(value):
        raise ValueError("must be an IP address or a host name (no scheme or port)")
    return value


Host = Annotated[str, AfterValidator(check_host)]
