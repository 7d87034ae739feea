"""Prometheus metrics: one Metrics object per app, owning its CollectorRegistry.

With several worker processes (GATEWAY_WORKERS > 1) every worker writes its samples to files in
PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode, chosen by that variable at
import) and the supervising process serves their sum on the admin port.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

# Latency buckets from 1 ms to 10 min: plain requests and long SSE streams in one histogram.
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip

REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                 0.5, 1.0)  # fmt: skip

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER = "other"  # the label of any path the upstream's document does not name
ROUTE_CACHE = 10_000  # paths whose label is remembered


class Metrics:
    """Every metric of the contract that the gateway core records. `multiprocess_dir`: the
    supervisor's shared directory, in a worker (its samples go there) and in the supervisor
    (it serves their sum); None in a single process."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, multiprocess_dir: str | None = None
    ) -> None:
        self.multiprocess_dir = multiprocess_dir
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_http_requests_total",
            "Requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "gateway_http_request_duration_seconds",
            "Time from request received to response complete (streams included), by route.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors_total",
            "Failed exchanges with the upstream, by kind.",
            ["kind"],
            registry=r,
        )
        self.inflight = Gauge(
            "gateway_inflight_requests",
            "Requests being handled now, streams included.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.ratelimit_decisions = Counter(
            "gateway_ratelimit_decisions_total",
            "Rate-limit decisions by policy: allowed and limited (Redis), fallback_allowed and "
            "fallback_limited (local buckets while Redis is unavailable), open_allowed and "
            "closed_rejected (failure_mode open / closed while Redis is unavailable); `plan` is "
            "the plan whose version of the policy applied (`default`, or a configured plan).",
            ["policy", "decision", "plan"],
            registry=r,
        )
        self.ratelimit_backend_errors = Counter(
            "gateway_ratelimit_backend_errors_total",
            "Redis round trips of the limiter that failed (down, timed out, refused the script).",
            registry=r,
        )
        self.ratelimit_fallback = Gauge(
            "gateway_ratelimit_fallback_active",
            "1 while Redis is unavailable to the limiter and policies follow their failure_mode.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.ratelimit_redis_duration = Histogram(
            "gateway_ratelimit_redis_duration_seconds",
            "Latency of the limiter's Redis round trips (one per batch of concurrent requests; "
            "the count is the number of round trips).",
            buckets=REDIS_BUCKETS,
            registry=r,
        )
        self.ratelimit_clock_skew = Gauge(
            "gateway_ratelimit_redis_clock_skew_seconds",
            "Redis TIME minus this host's clock, from the latest limiter round trip (buckets use "
            "Redis time, so skew does not change limits; large values point at NTP trouble).",
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.ratelimit_tokens = Counter(
            "gateway_ratelimit_tokens_total",
            "Model tokens of token budgets, by budget and kind: reserved before forwarding, "
            "debited (usage above the reservation), refunded (below it, or the model never "
            "answered), unsettled (no usage reported: the reservation stands).",
            ["policy", "kind"],
            registry=r,
        )
        self.ratelimit_settlement_errors = Counter(
            "gateway_ratelimit_settlement_errors_total",
            "Token settlements (debits, refunds) that Redis did not take.",
            registry=r,
        )
        self.ratelimit_streams = Gauge(
            "gateway_ratelimit_concurrent_leases",
            "Concurrency leases held (requests in flight under a `concurrent` cap, streams "
            "included).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.ratelimit_overrides = Gauge(
            "gateway_ratelimit_overrides",
            "Per-user limit overrides this process holds from Redis (lapsed ones included until "
            "they are removed); it follows a change within "
            "GATEWAY_RATELIMIT_OVERRIDES_REFRESH_SECONDS.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.ratelimit_policy_reloads = Counter(
            "gateway_ratelimit_policy_reloads_total",
            "SIGHUP reloads of the rate-limit policy file, by result (ok, error).",
            ["result"],
            registry=r,
        )
        self.tls_expiry = Gauge(
            "gateway_tls_certificate_expiry_timestamp_seconds",
            "Expiry (Unix time) of the certificate new HTTPS handshakes get; with several "
            "workers the earliest any of them serves.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.tls_reloads = Counter(
            "gateway_tls_reloads_total",
            "Certificate reloads (SIGHUP or a change seen by the poll), by result (ok, error: "
            "the files could not be served and the current certificate was kept).",
            ["result"],
            registry=r,
        )
        self._routes: dict[str, str] = {}
        self._templates: list[tuple[re.Pattern[str], str]] = []
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._push_inflight: Callable[[], int] | None = None

    def track_inflight(self, count: Callable[[], int]) -> None:
        """The in-flight gauge reads `count` at scrape time: no per-request cost. Worker
        processes (multiprocess mode, where callbacks cannot be summed) push it instead."""
        if self.multiprocess_dir is None:
            self.inflight.set_function(count)
            return
        self._push_inflight = count

    def push_inflight(self) -> None:
        if self._push_inflight is not None:
            self.inflight.set(self._push_inflight())

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one response and its duration (label children cached: labels() is slow)."""
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            label = method if method in METHODS else "OTHER"
            children = (
                self.requests.labels(label, route, str(status)),
                self.duration.labels(route),
            )
            if len(self._children) < 10_000:
                self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def use_routes(self, templates: list[str]) -> None:
        """The upstream's path templates (from its OpenAPI document): the only labels a proxied
        request can get besides `other`, so no client can invent a label by the path it asks."""
        routes = []
        for template in sorted(templates, key=lambda t: (t.count("{"), -len(t))):
            parts = re.split(r"\{[^}/]+\}", template)
            pattern = "[^/]+".join(re.escape(part) for part in parts)
            routes.append((re.compile(f"^{pattern}$"), template))
        self._templates = routes
        self._routes = {}

    def route(self, path: str) -> str:
        """The label of a proxied path: the upstream route template it matches, else `other`
        (whatever the status, so junk paths cannot crowd out real routes)."""
        label = self._routes.get(path)
        if label is None:
            label = OTHER
            for pattern, template in self._templates:
                if pattern.match(path):
                    label = template
                    break
            if len(self._routes) >= ROUTE_CACHE:
                self._routes.clear()
            self._routes[path] = label
        return label

    def render(self) -> tuple[bytes, str]:
        """The exposition: this registry, or the sum over worker processes."""
        path = self.multiprocess_dir
        if path is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=path)  # type: ignore[no-untyped-call]
        return generate_latest(merged), CONTENT_TYPE_LATEST


metrics_key = web.AppKey("metrics", Metrics)


async def metrics_handler(request: web.Request) -> web.Response:
    """GET /metrics (admin port only)."""
    body, content_type = request.app[metrics_key].render()
    response = web.Response(body=body)
    response.content_type = content_type.split(";")[0]
    response.charset = "utf-8"
    return response


def create_admin_app(metrics: Metrics, limits: web.Application | None = None) -> web.Application:
    """The admin listener's app: `/metrics` (and the limits API at `/limits`), never served on
    the public ports."""
    app = web.Application()
    app[metrics_key] = metrics
    app.router.add_get("/metrics", metrics_handler)
    if limits is not None:
        app.add_subapp("/limits", limits)
    return app
