"""The image's HEALTHCHECK: GET /healthz of the service this container runs; exit 0 when it is 200.

Which service: the process running `python -m upstream` (or `pixelcraft-upstream`) makes it the
chat service, anything else the gateway (the image's default command). Where: the service's own
settings class, read exactly as the service reads it (environment and `.env` in the working
directory), so a port or address changed through either is followed:

- gateway: `GATEWAY_HTTP_PORT`, or, with TLS on and `GATEWAY_HTTPS_REDIRECT` true (the HTTP
  port then answers `/healthz` with a 308), `https://` on `GATEWAY_HTTPS_PORT`. The certificate
  is not verified: it names the public host, and this asks only whether the process answers.
- upstream: `UPSTREAM_PORT`.

A wildcard listen address (0.0.0.0, ::) is reached on 127.0.0.1. Only the standard library's
urllib: the image has no curl.
"""

from __future__ import annotations

import itertools
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

TIMEOUT = 4.0
WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def running_service() -> str:
    """'upstream' when a process of this container runs the chat service, else 'gateway'."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        words = [Path(arg.decode(errors="replace")).name for arg in argv if arg]
        if "pixelcraft-upstream" in words:
            return "upstream"
        for flag, module in itertools.pairwise(words):
            if flag == "-m" and module == "upstream":
                return "upstream"
    return "gateway"


def reachable(host: str) -> str:
    if host in WILDCARDS:
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def healthz_url() -> tuple[str, ssl.SSLContext | None]:
    if running_service() == "upstream":
        from upstream.settings import UpstreamSettings

        up = UpstreamSettings()
        return f"http://{reachable(up.upstream_host)}:{up.upstream_port}/healthz", None

    from gateway.settings import GatewaySettings

    gw = GatewaySettings()
    host = reachable(gw.gateway_host)
    if gw.gateway_tls_cert_file is not None and gw.gateway_https_redirect:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return f"https://{host}:{gw.gateway_https_port}/healthz", context
    return f"http://{host}:{gw.gateway_http_port}/healthz", None


def main() -> int:
    try:
        url, context = healthz_url()
    except Exception as exc:  # invalid settings: the service itself would not be running
        print(f"healthcheck: cannot read the settings: {type(exc).__name__}", file=sys.stderr)
        return 1
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT, context=context) as resp:  # noqa: S310
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    print(f"healthcheck: {url}: {status}")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
