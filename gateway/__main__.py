"""`python -m gateway`: validate the environment, check Redis, then serve."""

from __future__ import annotations

import argparse
import sys

import uvloop

from gateway.server import serve
from gateway.settings import GatewaySettings
from gateway.supervisor import supervise
from pixelcraft import logs
from pixelcraft.boot import (
    EX_UNAVAILABLE,
    DependencyUnavailable,
    effective_settings,
    fail,
    load_settings,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gateway",
        description=(
            "PixelCraft gateway: the edge every external request passes through. Configured by "
            "environment variables (and .env); see README.md. Exits 78 on invalid "
            "configuration, 69 when Redis stays unreachable. SIGTERM drains in-flight requests "
            "and exits 0; SIGHUP reloads what is reloadable."
        ),
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration, print the effective settings (secrets masked), exit",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = load_settings(GatewaySettings, "gateway")
    if args.check_config:
        print("\n".join(effective_settings(settings)))
        print("configuration OK")
        return
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
