"""Run an aiohttp app on some sockets until SIGTERM or SIGINT, then shut down cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence

from aiohttp import web

logger = logging.getLogger(__name__)


async def serve(
    app: web.Application, listen: Sequence[tuple[str, int]], *, shutdown_timeout: float
) -> None:
    """Start the app (its cleanup contexts first: no port opens if they fail), serve, stop.

    The handler of a client that disconnects is cancelled (`handler_cancellation`), which is
    what stops a model stream nobody reads any more.
    """
    runner = web.AppRunner(
        app, handler_cancellation=True, shutdown_timeout=shutdown_timeout, access_log=None
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await runner.setup()
        for host, port in listen:
            await web.TCPSite(runner, host, port).start()
            logger.info("listening on http://%s:%d", host, port)
        await stop.wait()
        logger.info("shutting down (waiting up to %.0f s for requests)", shutdown_timeout)
    finally:
        await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
