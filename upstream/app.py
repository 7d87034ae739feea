"""create_app(settings): the chat service's wiring. No I/O until the app starts."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from importlib.metadata import version

from aiohttp import web

from pixelcraft.aio import Tasks
from pixelcraft.openapi import add_docs, app_operations, build_spec, json_bytes
from upstream import handlers
from upstream.db import pool_ctx
from upstream.keys import provider_key, settings_key, tasks_key
from upstream.llm import Provider
from upstream.llm.local import LocalProvider
from upstream.llm.openai import OpenAIProvider, make_session
from upstream.metrics import Metrics, metrics_handler, metrics_key, metrics_middleware
from upstream.middlewares import error_middleware, request_id_middleware
from upstream.settings import UpstreamSettings

logger = logging.getLogger(__name__)

VERSION = version("pixelcraft-gateway")
DESCRIPTION = (
    "The chat service behind the PixelCraft gateway: conversations stored in PostgreSQL, "
    "answers streamed from the model as Server-Sent Events. Clients call it through the "
    "gateway, which sets `X-User-Id`; see the gateway's /docs for rate limits."
)

# The JSON body of POST /v1/chat: 32,000 characters escaped as \uXXXX fit with room to spare.
MAX_BODY_BYTES = 256 * 1024


async def provider_ctx(app: web.Application) -> AsyncIterator[None]:
    """The configured model provider and, for `openai`, its HTTP session."""
    settings = app[settings_key]
    if provider_key in app:  # given to create_app
        yield
        return
    if settings.upstream_llm_provider == "local":
        app[provider_key] = LocalProvider(delay=settings.upstream_local_token_delay)
        yield
        return
    assert settings.openai_api_key is not None  # settings validation guarantees it
    session = make_session(settings.openai_connect_timeout, settings.openai_read_timeout)
    app[provider_key] = OpenAIProvider(
        session,
        base_url=settings.openai_base_url,
        api_key=settings.openai_api_key.get_secret_value(),
        model=settings.openai_model,
        max_retries=settings.openai_max_retries,
    )
    yield
    await session.close()


async def tasks_ctx(app: web.Application) -> AsyncIterator[None]:
    """Background tasks (replies saved after the client left) finish before the pool closes."""
    tasks = app[tasks_key] = Tasks("chat service")
    yield
    await tasks.close(wait=10)


def create_app(settings: UpstreamSettings, *, provider: Provider | None = None) -> web.Application:
    """The chat service; `provider` replaces the configured model (tests script one)."""
    app = web.Application(
        middlewares=[metrics_middleware, request_id_middleware, error_middleware],
        client_max_size=MAX_BODY_BYTES,
    )
    app[settings_key] = settings
    app[metrics_key] = Metrics(app)
    if provider is not None:
        app[provider_key] = provider
    # Order matters: contexts unwind in reverse, so tasks finish while the pool is still open.
    app.cleanup_ctx.extend([pool_ctx, provider_ctx, tasks_ctx])
    app.router.add_post("/v1/chat", handlers.chat)
    app.router.add_get("/v1/conversations", handlers.list_conversations)
    app.router.add_get("/v1/conversations/{id}", handlers.get_conversation)
    app.router.add_delete("/v1/conversations/{id}", handlers.delete_conversation)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/metrics", metrics_handler)  # undocumented: not part of the public API
    document = json_bytes(
        build_spec(
            app_operations(app),
            title="PixelCraft chat service",
            version=VERSION,
            description=DESCRIPTION,
        )
    )

    async def openapi(request: web.Request) -> web.Response:
        """GET /openapi.json: this service's OpenAPI 3 document."""
        return web.Response(body=document, content_type="application/json")

    app.router.add_get("/openapi.json", openapi)
    add_docs(app, title="PixelCraft chat service")
    return app
