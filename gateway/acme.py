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
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

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

    async def handle(self, request: web.Request) -> web.Response:
        """GET /.well-known/acme-challenge/<token>: the file's bytes; 404 for anything else."""
        if request.method not in ("GET", "HEAD"):
            raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD"])
        token = request.raw_path.partition("?")[0][len(CHALLENGE_PATH) :]
        if self.directory is None or not TOKEN.match(token):
            raise web.HTTPNotFound(text="no such challenge")
        body = await asyncio.to_thread(_read_challenge, self.directory / token)
        if body is None:
            raise web.HTTPNotFound(text="no such challenge")
        return web.Response(body=body, content_type="text/plain")


def https_location(request: web.Request, https_port: int) -> str | None:
    """The same resource on HTTPS at the same host; None without a usable Host header."""
    host = request.headers.get("Host", "")
    match = HOST.match(host)
    if match is None:
        return None
    port = "" if https_port == 443 else f":{https_port}"
    target = request.raw_path  # as sent; an absolute-form target becomes its path and query
    target = target if target.startswith("/") else request.rel_url.raw_path_qs
    return f"https://{match.group(1).lower()}{port}{target}"


def create_http_app(
    challenges: Challenges, https_port: int, edge: Callable[[Handler, str | None], Handler]
) -> web.Application:
    """The HTTP port's app when TLS is on: challenges, else a 308 to HTTPS."""

    async def to_https(request: web.Request) -> web.Response:
        location = https_location(request, https_port)
        if location is None:
            raise web.HTTPBadRequest(text="a Host header naming this server is required")
        return web.Response(status=308, headers={"Location": location})

    challenge = edge(challenges.handle, CHALLENGE_ROUTE)
    redirect = edge(to_https, "redirect to https")

    async def dispatch(request: web.Request) -> web.StreamResponse:
        # The raw path decides: the router sees it decoded and with dot-segments removed.
        if is_challenge(request.raw_path):
            return await challenge(request)
        return await redirect(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app


def add_challenge_route(
    app: web.Application, challenges: Challenges, edge: Callable[[Handler, str | None], Handler]
) -> None:
    """TLS off, GATEWAY_ACME_WEBROOT set (getting the first certificate): challenges on the
    public app, before its catch-all proxy route (aiohttp tries the longest prefix first)."""
    handler = edge(challenges.handle, CHALLENGE_ROUTE)
    app.router.add_route("*", CHALLENGE_PATH + "{tail:.*}", handler)
