"""OpenAPI 3 documents from aiohttp-apispec annotations, and an offline Swagger UI at /docs.

Handlers carry their operation (summary, description, parameters, requestBody, responses with
marshmallow schemas) through aiohttp-apispec's `docs` decorator; `build_spec` turns routes into
an OpenAPI 3.0 document with apispec's marshmallow plugin. (aiohttp-apispec's own generator
writes OpenAPI 2 only.) `/docs` is Swagger UI from the assets aiohttp-apispec ships,
served by the service itself: no CDN, no validator badge, nothing off-origin.
"""

from __future__ import annotations

import copy
import html
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar, cast

import aiohttp_apispec
from aiohttp import web
from aiohttp.typedefs import Handler
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

F = TypeVar("F", bound=Callable[..., Any])

OPENAPI_VERSION = "3.0.3"
ASSETS = Path(aiohttp_apispec.__file__).parent / "static"
ASSET_FILES = ("swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js",
               "favicon-32x32.png", "favicon-16x16.png")  # fmt: skip
# aiohttp-apispec writes OpenAPI 2 keys into every operation; they are not OpenAPI 3.
_NOT_OPENAPI_3 = ("schemas", "produces")


def documented(**operation: Any) -> Callable[[F], F]:
    """aiohttp-apispec's `docs`, typed: the OpenAPI 3 operation object of a handler."""
    return cast(Callable[[F], F], aiohttp_apispec.docs(**operation))


def operation_of(handler: Any) -> dict[str, Any] | None:
    """The operation a handler (or the handler it wraps) was documented with."""
    while handler is not None:
        found = getattr(handler, "__apispec__", None)
        if found is not None:
            return {k: v for k, v in copy.deepcopy(found).items() if k not in _NOT_OPENAPI_3}
        handler = getattr(handler, "__wrapped__", None)
    return None


Operation = tuple[str, str, Any]  # (method, path template, handler)


def app_operations(app: web.Application) -> list[Operation]:
    """Every route of an aiohttp app, as build_spec takes them."""
    return [
        (route.method, route.resource.canonical, route.handler)
        for route in app.router.routes()
        if route.resource is not None and route.resource.canonical
    ]


def build_spec(
    routes: Iterable[Operation], *, title: str, version: str, description: str
) -> dict[str, Any]:
    """The OpenAPI 3 document of every documented route."""
    spec = APISpec(
        title=title,
        version=version,
        openapi_version=OPENAPI_VERSION,
        plugins=[MarshmallowPlugin()],
        info={"description": description},
    )
    for method, path, handler in routes:
        operation = operation_of(handler)
        if operation is None or method.upper() == "HEAD":
            continue
        spec.path(path=path, operations={method.lower(): operation})
    document: dict[str, Any] = spec.to_dict()
    return document


def json_bytes(document: dict[str, Any]) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


SWAGGER_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<link rel="stylesheet" href="docs/static/swagger-ui.css">
<link rel="icon" type="image/png" href="docs/static/favicon-32x32.png" sizes="32x32">
<style>body {{ margin: 0; background: #fafafa; }}</style>
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/static/swagger-ui-bundle.js"></script>
<script src="docs/static/swagger-ui-standalone-preset.js"></script>
<script>
window.onload = function () {{
  window.ui = SwaggerUIBundle({{
    url: {spec_url},
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    layout: "StandaloneLayout"
  }});
}};
</script>
</body>
</html>
"""


def add_docs(
    app: web.Application,
    *,
    title: str,
    spec_url: str = "openapi.json",
    wrap: Callable[[Handler, str], Handler] | None = None,
) -> None:
    """GET /docs (Swagger UI pointing at `spec_url`, relative so it works behind any prefix)
    and its assets under /docs/static/; `wrap(handler, route_label)` wraps each handler."""
    page = SWAGGER_PAGE.format(title=html.escape(title), spec_url=json.dumps(spec_url)).encode()
    assets = {name: (ASSETS / name) for name in ASSET_FILES}

    async def docs_page(request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8")

    async def docs_asset(request: web.Request) -> web.StreamResponse:
        path = assets.get(request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Cache-Control": "public, max-age=86400"})

    if wrap is None:
        app.router.add_get("/docs", docs_page)
        app.router.add_get("/docs/static/{name}", docs_asset)
    else:
        app.router.add_get("/docs", wrap(docs_page, "/docs"))
        app.router.add_get("/docs/static/{name}", wrap(docs_asset, "/docs/static/{name}"))
