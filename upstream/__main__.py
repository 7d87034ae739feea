"""`python -m upstream`: validate the environment, then serve the chat service."""

from __future__ import annotations

import argparse
import logging

import uvloop

from pixelcraft import logs
from pixelcraft.boot import (
    EX_UNAVAILABLE,
    DependencyUnavailable,
    effective_settings,
    fail,
    load_settings,
)
from pixelcraft.serve import serve
from upstream.app import create_app
from upstream.settings import UpstreamSettings

logger = logging.getLogger("upstream")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m upstream",
        description=(
            "PixelCraft chat service: POST /v1/chat streams answers from the configured model "
            "and stores conversations in PostgreSQL. Configured by environment variables "
            "(and .env); see README.md. Exits 78 on invalid configuration, 69 when PostgreSQL "
            "stays unreachable."
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
    settings = load_settings(UpstreamSettings, "upstream")
    if args.check_config:
        print("\n".join(effective_settings(settings)))
        print("configuration OK")
        return
    logs.configure(settings.upstream_log_level, settings.upstream_log_format)
    app = create_app(settings)
    listen = [(settings.upstream_host, settings.upstream_port)]
    try:
        uvloop.run(serve(app, listen, shutdown_timeout=settings.upstream_drain_seconds))
    except DependencyUnavailable as exc:
        fail(EX_UNAVAILABLE, f"upstream: {exc}")
    except OSError as exc:
        fail(EX_UNAVAILABLE, f"upstream: cannot listen on {listen[0][0]}:{listen[0][1]}: {exc}")


if __name__ == "__main__":
    main()
