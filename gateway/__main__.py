"""`python -m gateway`: validate the environment, check Redis, then serve."""

from __future__ import annotations

import sys

import uvloop

from gateway.server import serve
from gateway.settings import GatewaySettings
from gateway.supervisor import supervise
from pixelcraft import logs
from pixelcraft.boot import (
    EX_UNAVAILABLE,
    DependencyUnavailable,
    check_config,
    command_line,
    fail,
    load_settings,
)

DESCRIPTION = (
    "PixelCraft gateway: the edge every external request passes through. Configured by "
    "environment variables (and .env); see README.md. Exits 78 on invalid configuration, 69 "
    "when Redis stays unreachable. SIGTERM drains in-flight requests and exits 0; SIGHUP "
    "reloads what is reloadable."
)


def main(argv: list[str] | None = None) -> None:
    # --worker (internal): one of GATEWAY_WORKERS processes started by the supervisor.
    args = command_line("python -m gateway", DESCRIPTION, argv, hidden=("--worker",))
    settings = load_settings(GatewaySettings, "gateway")
    if args.check_config:
        check_config(settings)
    logs.configure(settings.gateway_log_level, settings.gateway_log_format)
    try:
        if settings.gateway_workers > 1 and not args.worker:
            sys.exit(uvloop.run(supervise(settings)))
        uvloop.run(serve(settings, reuse_port=args.worker, admin=not args.worker))
    except DependencyUnavailable as exc:
        fail(EX_UNAVAILABLE, f"gateway: {exc}")
    except OSError as exc:
        fail(EX_UNAVAILABLE, f"gateway: cannot listen: {exc}")


if __name__ == "__main__":
    main()
