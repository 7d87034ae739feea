"""`python -m upstream`: validate the environment, then serve the chat service."""

from __future__ import annotations

import uvloop

from pixelcraft import logs
from pixelcraft.boot import (
    EX_UNAVAILABLE,
    DependencyUnavailable,
    check_config,
    command_line,
    fail,
    load_settings,
)
from pixelcraft.serve import serve
from upstream.app import create_app
from upstream.settings import UpstreamSettings

DESCRIPTION = (
    "PixelCraft chat service: POST /v1/chat streams answers from the configured model and "
    "stores conversations in PostgreSQL. Configured by environment variables (and .env); see "
    "README.md. Exits 78 on invalid configuration, 69 when PostgreSQL stays unreachable."
)


def main(argv: list[str] | None = None) -> None:
    args = command_line("python -m upstream", DESCRIPTION, argv)
    settings = load_settings(UpstreamSettings, "upstream")
    if args.check_config:
        check_config(settings)
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
