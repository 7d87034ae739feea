"""Prometheus metrics of the chat service: one Metrics object per app, owning its registry.

`GET /metrics` on UPSTREAM_PORT, which only the gateway and the monitoring network should reach
(like the port itself). The gateway forwards every path it does not serve, `/metrics` included,
and always adds `X-Forwarded-For`: a request carrying that header came through a proxy, not from
Prometheus, and gets the same 404 as an unknown route, so the public port never shows these.

The pool gauges are read from asyncpg when Prometheus scrapes, so they cost nothing per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import asyncpg
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from upstream.keys import pool_key

# From 5 ms (a listing) to 10 min (a long stream), like the gateway's histogram.
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
CLIENT_GONE = 499  # nginx's code for a client that left before the response was complete
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class PoolCollector(Collector):
    """The asyncpg pool's connections, read at scrape time (nothing before the pool exists)."""

    def __init__(self, app: web.Application) -> None:
        self._app = app

    def collect(self) -> Iterator[Metric]:
        pool: asyncpg.Pool | None = self._app.get(pool_key)
        if pool is None:
            return
        size, idle = pool.get_size(), pool.get_idle_size()
        gauges = (
            ("upstream_db_pool_connections", "Connections the pool holds open now.", size),
            (
                "upstream_db_pool_connections_in_use",
                "Pool connections acquired by a request or a background save now.",
                size - idle,
            ),
            ("upstream_db_pool_connections_idle", "Open pool connections free now.", idle),
            (
                "upstream_db_pool_max_connections",
                "Most connections the pool may open (DB_POOL_MAX_SIZE).",
                pool.get_max_size(),
            ),
            (
                "upstream_db_pool_min_connections",
                "Connections the pool keeps open (DB_POOL_MIN_SIZE).",
                pool.get_min_size(),
            ),
        )
        for name, documentation, value in gauges:
            yield GaugeMetricFamily(name, documentation, value=value)

    def describe(self) -> Iterator[Metric]:
        return iter(())  # the app's pool does not exist yet when the collector is registered


class Metrics:
    """Requests by route and status, their duration, and the pool."""

    def __init__(self, app: web.Application) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "upstream_http_requests_total",
            "Requests answered, by method, route template and status (499: the client left).",
            ["method", "route", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "upstream_http_request_duration_seconds",
            "Time from request received to response complete (streams included), by route.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        r.register(PoolCollector(app))
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one response (label children cached: labels() is slow)."""
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = self.requests.labels(method, route, str(status)), self.duration.labels(route)
            self._children[key] = children  # bounded: routes are the app's templates
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


metrics_key = web.AppKey("metrics", Metrics)


def route_of(request: web.Request) -> str:
    """The route template (`/v1/conversations/{id}`), `unmatched` when no route matched."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and time every response; outermost, so problem bodies are counted as sent."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = CLIENT_GONE
        raise
    finally:
        method = request.method if request.method in METHODS else "OTHER"
        request.app[metrics_key].observe(method, route_of(request), status, loop.time() - started)


async def metrics_handler(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format; 404 through a proxy (see the module docstring)."""
    if "X-Forwarded-For" in request.headers:
        raise web.HTTPNotFound()
    response = web.Response(body=request.app[metrics_key].render())
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    response.charset = "utf-8"
    return response
