"""The gateway's error tree."""

from __future__ import annotations

from pixelcraft.boot import DependencyUnavailable


class GatewayError(Exception):
    """Base of the gateway's own errors."""


class RedisUnreachable(DependencyUnavailable):
    """Redis did not answer at boot within the retry budget."""
