"""GET /metrics of the chat service: pool gauges read at scrape time, requests by route."""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.support.sse import collect
from tests.upstream.conftest import UpstreamFactory
from upstream.keys import pool_key


async def scrape(client: TestClient[Any, Any]) -> dict[tuple[str, frozenset[Any]], float]:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(await resp.text()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[tuple[str, frozenset[Any]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_pool_gauges_follow_the_pool(make_upstream: UpstreamFactory) -> None:
    client = await make_upstream(db_pool_min_size=1, db_pool_max_size=4)
    samples = await scrape(client)
    assert value(samples, "upstream_db_pool_max_connections") == 4
    assert value(samples, "upstream_db_pool_min_connections") == 1
    assert value(samples, "upstream_db_pool_connections_in_use") == 0
    open_now = value(samples, "upstream_db_pool_connections")
    assert open_now >= 1
    assert value(samples, "upstream_db_pool_connections_idle") == open_now

    pool = client.app[pool_key]
    async with pool.acquire(), pool.acquire():
        samples = await scrape(client)
        assert value(samples, "upstream_db_pool_connections_in_use") == 2
        assert value(samples, "upstream_db_pool_connections") >= 2
    samples = await scrape(client)
    assert value(samples, "upstream_db_pool_connections_in_use") == 0


async def test_requests_are_counted_by_route_template(make_upstream: UpstreamFactory) -> None:
    client = await make_upstream()
    user = {"X-User-Id": f"user-{uuid.uuid4().hex[:12]}"}
    resp = await client.post("/v1/chat", json={"message": "count me"}, headers=user)
    assert [name for name, _ in await collect(resp)][-1] == "done"
    assert (await client.get(f"/v1/conversations/{uuid.uuid4()}", headers=user)).status == 404
    assert (await client.get("/nope")).status == 404
    assert (await client.get("/v1/conversations")).status == 400  # no X-User-Id

    samples = await scrape(client)
    total = "upstream_http_requests_total"
    assert value(samples, total, method="POST", route="/v1/chat", status="200") == 1
    assert value(samples, total, method="GET", route="/v1/conversations/{id}", status="404") == 1
    assert value(samples, total, method="GET", route="unmatched", status="404") == 1
    assert value(samples, total, method="GET", route="/v1/conversations", status="400") == 1
    count = "upstream_http_request_duration_seconds_count"
    assert value(samples, count, route="/v1/chat") == 1


async def test_metrics_through_a_proxy_are_not_found(make_upstream: UpstreamFactory) -> None:
    """The gateway forwards unknown paths and always sets X-Forwarded-For: no public leak."""
    client = await make_upstream()
    resp = await client.get("/metrics", headers={"X-Forwarded-For": "203.0.113.7"})
    assert resp.status == 404
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    assert "upstream_" not in await resp.text()


async def test_each_app_has_its_own_registry(make_upstream: UpstreamFactory) -> None:
    first, second = await make_upstream(), await make_upstream()
    for _ in range(3):
        assert (await first.get("/healthz")).status == 200
    total = "upstream_http_requests_total"
    labels = {"method": "GET", "route": "/healthz", "status": "200"}
    assert value(await scrape(first), total, **labels) == 3
    assert value(await scrape(second), total, **labels) == 0
