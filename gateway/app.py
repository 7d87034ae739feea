"""create_app(settings): the gateway's wiring. No I/O until the app starts."""

from __future__ import annotations

from aiohttp import web

from gateway.keys import settings_key
from gateway.redis import redis_ctx
from gateway.settings import GatewaySettings


async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers (dependencies are /readyz's business)."""
    return web.json_response({"status": "ok"})


def create_app(settings: GatewaySettings) -> web.Application:
    app = web.Application()
    app[settings_key] = settings
    app.cleanup_ctx.append(redis_ctx)
    app.router.add_get("/healthz", healthz)
    return app
