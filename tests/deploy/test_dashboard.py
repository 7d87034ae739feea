"""config/grafana/pixelcraft.json: a Grafana dashboard whose every query promtool accepts and
names only metrics, labels and label values that a live gateway (with TLS) and chat service
export, checked with the same live exports as config/prometheus's alert rules."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.test_prometheus_rules import (
    METRIC,
    SYNTHETIC,
    TARGET_LABELS,
    TLS_METRICS,
    Families,
    exported,  # noqa: F401  (the live gateway and chat service fixture)
    promtool,
    run,
    selector_problems,
    tls_available,
)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "config" / "grafana" / "pixelcraft.json"
# Grafana's own range macros, which Prometheus never sees; any duration stands in for promtool.
MACROS = re.compile(r"\$__(?:rate_interval|interval|range)\b")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
# What the dashboard is for: a panel on each of these (the issue's list).
REQUIRED = {
    "gateway_http_requests_total",
    "gateway_http_request_duration_seconds_bucket",
    "gateway_ratelimit_decisions_total",
    "gateway_ratelimit_fallback_active",
    "gateway_ratelimit_redis_duration_seconds_bucket",
    "gateway_ratelimit_redis_clock_skew_seconds",
    "gateway_upstream_errors_total",
    "gateway_tls_certificate_expiry_timestamp_seconds",
    "upstream_db_pool_connections_in_use",
}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def queries() -> Iterator[tuple[str, str]]:
    """(panel title and refId, PromQL) of every query."""
    for panel in panels():
        for target in panel["targets"]:
            yield f"{panel['title']} {target['refId']}", target["expr"]


def names(expr: str) -> set[str]:
    return set(METRIC.findall(re.sub(r'"[^"]*"', '""', expr)))


def test_the_dashboard_is_a_grafana_dashboard_on_a_prometheus_variable() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    assert board["uid"] and board["title"]
    (variable,) = [v for v in board["templating"]["list"] if v["name"] == "datasource"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


def test_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_every_metric_the_issue_asks_for_has_a_panel() -> None:
    used = set().union(*(names(expr) for _, expr in queries()))
    assert REQUIRED - used == set()


def test_promtool_accepts_every_query(tmp_path: Path) -> None:
    """Each query as the expression of a rule, so that `promtool check rules` parses it."""
    binary = promtool()
    rules = [
        {"record": f"pixelcraft:dashboard:{i}", "expr": MACROS.sub("5m", expr)}
        for i, (_, expr) in enumerate(queries())
    ]
    (tmp_path / "dashboard.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    result = run(binary, "check", "rules", "dashboard.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


async def test_every_metric_a_query_names_is_exported(exported: Families) -> None:  # noqa: F811
    missing: dict[str, str] = {}
    for where, expr in queries():
        for name in names(expr):
            if name in SYNTHETIC or name in exported:
                continue
            if name in TLS_METRICS and not tls_available():
                continue
            missing.setdefault(name, where)
    assert missing == {}


async def test_labels_and_label_values_the_queries_use_exist(exported: Families) -> None:  # noqa: F811
    problems = []
    for where, expr in queries():
        problems += selector_problems(where, expr, exported)
        # `by (...)` and the like: a label no metric of the query has silently sums everything.
        known = {
            label
            for name in names(expr)
            if name in exported
            for sample in exported[name][1]
            for label in sample
        }
        if not known:
            continue  # no samples yet (a counter nothing has incremented): nothing to compare
        for group in GROUPING.findall(expr):
            for label in filter(None, (part.strip() for part in group.split(","))):
                if label not in TARGET_LABELS and label not in known:
                    problems.append(f"{where}: no metric of the query has the label {label}")
    assert problems == []
