"""The HTTP port's own routes: ACME http-01 challenges and, when TLS is on, the way to HTTPS.

certbot `--webroot -w DIR` writes each challenge to DIR/.well-known/acme-challenge/<token> and the
CA fetches it over plain HTTP on port 80 (RFC 8555 §8.3). Only a well-formed token (base64url,
§8.3) names a file; the check runs on the raw request path, before any percent-decoding or
dot-segment removal, so no request can name anything else. Everything else on the HTTP port is a
308 to the same host on HTTPS (308, not 301: the method and body are kept, RFC 9110 §15.4.9).
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

CHALLENGE_PATH = "/.well-known/acme-challenge/"
CHALLENGE_ROUTE = "/.well-known/acme-challenge/{token}"
TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
MAX_CHALLENGE_BYTES = 4096  # a key authorization is under 200 bytes
# A host name or IP literal and an optional port: nothing that could end the authority.
HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::[0-9]{1,5})?$")


def is_challenge(raw_path: str) -> bool:
    path = raw_path.partition("?")[0]
    return path.startswith(CHALLENGE_PATH) or path == CHALLENGE_PATH.rstrip("/")


def _read_challenge(path: Path) -> bytes | None:
    try:
        with path.open("rb") as file:
            body = file.read(MAX_CHALLENGE_BYTES + 1)
    except OSError:  # missing, a directory, unreadable
        return None
    return body if len(body) <= MAX_CHALLENGE_BYTES else None


class Challenges:
    """Serves the challenge files certbot writes under the webroot."""

    def __init__(self, webroot: Path | None) -> None:
        self.directory = webroot / ".well-known" / "acme-challenge" if webroot else None

    async def read(self, raw_path: str) -> bytes | None:
        """The file a challenge path names, None for anything that names no challenge: the
        token is checked on the raw path, before any decoding."""
        token = raw_path.partition("?")[0][len(CHALLENGE_PATH) :]
        if self.directory is None or not TOKEN.match(token):
            return None
        return await asyncio.to_thread(_read_challenge, self.directory / token)


def https_location(host: str | None, target: str, https_port: int) -> str | None:
    """The same resource on HTTPS at the same host; None without a usable Host header.
    `target` is the request's path and query as sent."""
    match = HOST.match(host or "")
    if match is None:
        return None
    port = "" if https_port == 443 else f":{https_port}"
    return f"https://{match.group(1).lower()}{port}{target}"
