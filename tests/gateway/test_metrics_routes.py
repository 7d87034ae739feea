"""The route label of gateway_http_*: only the upstream's templates, else `other`."""

from __future__ import annotations

import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics as metrics_module
from gateway.metrics import Metrics

TEMPLATES = ["/v1/chat", "/v1/conversations", "/v1/conversations/{conversation_id}"]


@pytest.fixture
def metrics() -> Metrics:
    m = Metrics()
    m.use_routes(TEMPLATES)
    return m


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/v1/chat", "/v1/chat"),
        ("/v1/conversations", "/v1/conversations"),
        ("/v1/conversations/6f1c0a9e", "/v1/conversations/{conversation_id}"),
        ("/v1/conversations/6f1c0a9e/messages", "other"),  # a parameter is one segment
        ("/v1/conversations/", "other"),
        ("/v1/chatter", "other"),
        ("/v1/chat/", "other"),
        ("/admin", "other"),
    ],
)
def test_a_path_gets_its_template_or_other(metrics: Metrics, path: str, label: str) -> None:
    assert metrics.route(path) == label


def test_before_any_templates_everything_is_other() -> None:
    assert Metrics().route("/v1/chat") == "other"


def test_new_templates_replace_the_old_and_what_was_remembered(metrics: Metrics) -> None:
    assert metrics.route("/v2/chat") == "other"
    metrics.use_routes(["/v2/chat"])
    assert metrics.route("/v2/chat") == "/v2/chat"
    assert metrics.route("/v1/chat") == "other"


def test_invented_paths_cannot_invent_labels(
    metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_module, "ROUTE_CACHE", 50)
    for n in range(500):
        path = f"/v1/conversations/{uuid.uuid4().hex}" if n % 2 else f"/junk/{n}"
        metrics.observe("GET", metrics.route(path), 200, 0.01)
        assert len(metrics._routes) <= 50  # the remembered paths stay bounded
    assert metrics.route("/v1/chat") == "/v1/chat"  # and still right after being emptied
    labels = {
        sample.labels["route"]
        for family in text_string_to_metric_families(metrics.render()[0].decode())
        if family.name == "gateway_http_requests"
        for sample in family.samples
    }
    assert labels == {"other", "/v1/conversations/{conversation_id}"}
