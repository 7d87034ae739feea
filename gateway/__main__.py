"""`python -m gateway`: validate the environment, check Redis, then serve."""

from __future__ import annotations

import argparse

import uvloop

from gateway.app import create_app
from gateway.settings import GatewaySettings
from pixelcraft import logs
from pixelcraft.boot import (
    EX_UNAVAILABLE,
    DependencyUnavailable,
    effective_settings,
    fail,
    load_settings,
)
from pixelcraft.serve import serve


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gateway",
        description=(
            "PixelCraft gateway: the edge every external request passes through. Configured by "
            "environment variables (and .env); see README.md. Exits 78 on invalid "
            "configuration, 69 when Redis stays unreachable."
        ),
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration, print the effective settings (secrets masked), exit",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = load_settings(GatewaySettings, "gateway")
    if args.check_config:
        print("\n".join(effective_settings(settings)))
        print("configuration OK")
        return
    logs.configure(settings.gateway_log_level, settings.gateway_log_format)
    app = create_app(settings)
    listen = [(settings.gateway_host, settings.gateway_http_port)]
    try:
        uvloop.run(serve(app, listen, shutdown_timeout=settings.gateway_drain_seconds))
    except DependencyUnavailable as exc:
        fail(EX_UNAVAILABLE, f"gateway: {exc}")
    except OSError as exc:
        fail(EX_UNAVAILABLE, f"gateway: cannot listen on {listen[0][0]}:{listen[0][1]}: {exc}")


if __name__ == "__main__":
    main()
