"""config/prometheus: promtool accepts the scrape config and the rules, each alert fires on the
series it is written for and on nothing else (promtool unit tests), every rule is annotated, and
every metric the rules, their annotations and the scrape config name is exported by a real
gateway (with TLS, as a process) and a real chat service."""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from devtools.services import dev_certificate
from gateway.settings import GatewaySettings
from tests.conftest import GatewayStarter
from upstream.app import create_app as create_upstream
from upstream.settings import UpstreamSettings

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config" / "prometheus"
PROMETHEUS_YML = CONFIG / "prometheus.yml"
ALERTS_YML = CONFIG / "alerts.yml"
SEVERITIES = {"page", "ticket"}
# Series Prometheus makes itself for every target, not exported by either service.
SYNTHETIC = {"up"}
# Exported only by a gateway whose TLS code is present (gateway/tls/); see exported_names.
TLS_METRICS = {
    "gateway_tls_certificate_expiry_timestamp_seconds",
    "gateway_tls_reloads_total",
}
# Labels Prometheus adds to every series of a target (job, instance) or that the scrape config
# sets (service), and the bucket label of histograms.
TARGET_LABELS = {"job", "instance", "service", "le"}
METRIC = re.compile(r"\b((?:gateway|upstream)_[a-z0-9_]+)\b")
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
# Label values that come from our code, not from traffic: a typo there silently never matches.
CHECKED_VALUES = {"route", "result"}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool missing: apt-get install prometheus (.ci/run installs it)")
    return found


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS_YML.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def run(*argv: str, cwd: Path = CONFIG) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


# --- promtool -------------------------------------------------------------------------------


def test_promtool_checks_the_scrape_config_and_its_rules() -> None:
    result = run(promtool(), "check", "config", str(PROMETHEUS_YML))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_checks_the_rules() -> None:
    result = run(promtool(), "check", "rules", str(ALERTS_YML))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


GW = {"job": "pixelcraft-gateway", "instance": "gw:9100", "service": "gateway"}
UP = {"job": "pixelcraft-upstream", "instance": "up:8000", "service": "upstream"}


def series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def fires(alert: str, at: str, *labels: dict[str, str]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alert, "exp_alerts": [{"exp_labels": x} for x in labels]}


def quiet(alert: str, at: str) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alert, "exp_alerts": []}


def by_instance(instance: str, severity: str, service: str) -> dict[str, str]:
    """The labels of an alert whose expression aggregates `by (instance)`."""
    return {"instance": instance, "severity": severity, "service": service}


def requests(status: str, per_minute: int, route: str = "/v1/conversations") -> dict[str, str]:
    labels = {**GW, "method": "GET", "route": route, "status": status}
    return series("gateway_http_requests_total", labels, f"0+{per_minute}x40")


def buckets(route: str, counts: dict[str, int]) -> list[dict[str, str]]:
    """A histogram whose buckets grow by `counts[le]` a minute."""
    name = "gateway_http_request_duration_seconds_bucket"
    return [series(name, {**GW, "route": route, "le": le}, f"0+{n}x40") for le, n in counts.items()]


DAY = 86400
CASES: list[dict[str, Any]] = [
    {  # a healthy, idle service: every metric present, nothing fires
        "interval": "1m",
        "input_series": [
            series("up", GW, "1x80"),
            series("up", UP, "1x80"),
            requests("200", 0),
            requests("502", 0),
            *buckets("/v1/conversations", {"0.5": 0, "1": 0, "+Inf": 0}),
            *buckets("/v1/chat", {"60": 0, "120": 0, "+Inf": 0}),
            series("gateway_upstream_errors_total", {**GW, "kind": "connect"}, "0x80"),
            series("gateway_ratelimit_fallback_active", GW, "0x80"),
            series("gateway_ratelimit_backend_errors_total", GW, "0x80"),
            series("gateway_tls_certificate_expiry_timestamp_seconds", GW, "0x80"),  # TLS off
            series("gateway_tls_reloads_total", {**GW, "result": "error"}, "0x80"),
            series("upstream_db_pool_connections_in_use", UP, "0x80"),
            series("upstream_db_pool_max_connections", UP, "30x80"),
            series("upstream_http_requests_total", {**UP, "status": "503"}, "0x80"),
        ],
        "alert_rule_test": [quiet(rule["alert"], "75m") for rule in rules()],
    },
    {  # busy and healthy: 1 % 5xx, fast reads, slow-but-normal chats, valid certificate
        "interval": "1m",
        "input_series": [
            requests("200", 990),
            requests("502", 10),
            series("gateway_upstream_errors_total", {**GW, "kind": "connect"}, "0+5x40"),
            *buckets("/v1/conversations", {"0.25": 990, "1": 1000, "+Inf": 1000}),
            *buckets("/v1/chat", {"30": 900, "60": 995, "120": 1000, "+Inf": 1000}),
            series("gateway_tls_certificate_expiry_timestamp_seconds", GW, f"{60 * DAY}x80"),
            series("gateway_tls_reloads_total", {**GW, "result": "ok"}, "0+1x80"),
            series("upstream_db_pool_connections_in_use", UP, "20x40"),
            series("upstream_db_pool_max_connections", UP, "30x40"),
        ],
        "alert_rule_test": [
            quiet(alert, "35m")
            for alert in (
                "PixelCraftHigh5xxRate",
                "PixelCraftUpstreamErrors",
                "PixelCraftHighLatency",
                "PixelCraftSlowChatStreams",
                "PixelCraftCertificateExpiresSoon",
                "PixelCraftCertificateNotRenewed",
                "PixelCraftCertificateReloadFailed",
                "PixelCraftDBPoolSaturated",
            )
        ],
    },
    {
        "interval": "1m",
        "input_series": [series("up", GW, "1 1 0x10")],
        "alert_rule_test": [
            quiet("PixelCraftTargetDown", "3m"),  # down since 2m, not for 2m yet
            fires("PixelCraftTargetDown", "5m", {**GW, "severity": "page"}),
        ],
    },
    {  # 10 % 5xx; then a night with 5 errors in 5 minutes (16 %) stays quiet: too few
        "interval": "1m",
        "input_series": [requests("200", 90), requests("502", 10)],
        "alert_rule_test": [
            quiet("PixelCraftHigh5xxRate", "5m"),
            fires("PixelCraftHigh5xxRate", "12m", by_instance("gw:9100", "page", "gateway")),
        ],
    },
    {
        "interval": "1m",
        "input_series": [requests("200", 5), requests("500", 1)],
        "alert_rule_test": [quiet("PixelCraftHigh5xxRate", "20m")],
    },
    {
        "interval": "1m",
        "input_series": [
            requests("200", 100),
            series("gateway_upstream_errors_total", {**GW, "kind": "connect_timeout"}, "0+5x40"),
        ],
        "alert_rule_test": [
            fires("PixelCraftUpstreamErrors", "12m", by_instance("gw:9100", "page", "gateway")),
        ],
    },
    {  # p99 of reads between 1 and 2.5 s; chats fast: only the first alert
        "interval": "1m",
        "input_series": [
            *buckets("/v1/conversations", {"0.5": 90, "1": 95, "2.5": 100, "+Inf": 100}),
            *buckets("/v1/chat", {"10": 100, "+Inf": 100}),
        ],
        "alert_rule_test": [
            quiet("PixelCraftHighLatency", "8m"),
            fires("PixelCraftHighLatency", "20m", by_instance("gw:9100", "page", "gateway")),
            quiet("PixelCraftSlowChatStreams", "35m"),
        ],
    },
    {  # chats of minutes, reads fast: only the chat rule, and no page
        "interval": "1m",
        "input_series": [
            *buckets("/v1/chat", {"60": 50, "120": 90, "300": 100, "+Inf": 100}),
            *buckets("/v1/conversations", {"0.1": 100, "+Inf": 100}),
        ],
        "alert_rule_test": [
            quiet("PixelCraftHighLatency", "35m"),
            fires("PixelCraftSlowChatStreams", "35m", by_instance("gw:9100", "ticket", "gateway")),
        ],
    },
    {
        "interval": "1m",
        "input_series": [series("gateway_ratelimit_fallback_active", GW, "0 1x10")],
        "alert_rule_test": [
            quiet("PixelCraftRateLimiterDegraded", "1m"),
            fires("PixelCraftRateLimiterDegraded", "3m", by_instance("gw:9100", "page", "gateway")),
        ],
    },
    {  # one failed round trip at 3m: a ticket while it is in the 5-minute window, then gone
        "interval": "1m",
        "input_series": [series("gateway_ratelimit_backend_errors_total", GW, "0 0 0 1x20")],
        "alert_rule_test": [
            quiet("PixelCraftRedisErrors", "2m"),
            fires("PixelCraftRedisErrors", "4m", by_instance("gw:9100", "ticket", "gateway")),
            quiet("PixelCraftRedisErrors", "10m"),
        ],
    },
    {  # 10 days left: both certificate alerts (time() starts at 0 in promtool)
        "interval": "1m",
        "input_series": [
            series("gateway_tls_certificate_expiry_timestamp_seconds", GW, f"{10 * DAY}x90")
        ],
        "alert_rule_test": [
            fires("PixelCraftCertificateExpiresSoon", "15m", {**GW, "severity": "page"}),
            fires("PixelCraftCertificateNotRenewed", "65m", {**GW, "severity": "ticket"}),
        ],
    },
    {  # 20 days left: renewal overdue, not yet urgent
        "interval": "1m",
        "input_series": [
            series("gateway_tls_certificate_expiry_timestamp_seconds", GW, f"{20 * DAY}x90")
        ],
        "alert_rule_test": [
            quiet("PixelCraftCertificateExpiresSoon", "65m"),
            quiet("PixelCraftCertificateNotRenewed", "30m"),
            fires("PixelCraftCertificateNotRenewed", "65m", {**GW, "severity": "ticket"}),
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            series("gateway_tls_reloads_total", {**GW, "result": "error"}, "0 0 1x10"),
            series("gateway_tls_reloads_total", {**GW, "result": "ok"}, "0+1x10"),
        ],
        "alert_rule_test": [
            quiet("PixelCraftCertificateReloadFailed", "1m"),
            fires(
                "PixelCraftCertificateReloadFailed",
                "3m",
                by_instance("gw:9100", "ticket", "gateway"),
            ),
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            series("upstream_db_pool_connections_in_use", UP, "25x20"),
            series("upstream_db_pool_max_connections", UP, "30x20"),
        ],
        "alert_rule_test": [
            quiet("PixelCraftDBPoolSaturated", "3m"),
            fires("PixelCraftDBPoolSaturated", "6m", {**UP, "severity": "page"}),
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            series("upstream_http_requests_total", {**UP, "status": "503"}, "0+2x10"),
        ],
        "alert_rule_test": [
            fires("PixelCraftDBUnavailable", "5m", by_instance("up:8000", "page", "upstream")),
        ],
    },
]


def test_each_alert_fires_on_its_series_and_not_on_healthy_ones(tmp_path: Path) -> None:
    """promtool's unit tests compare annotations too; their templates are checked by `promtool
    check rules` above, so this copy drops them and tests expressions, durations and labels."""
    binary = promtool()
    document = yaml.safe_load(ALERTS_YML.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(document))
    tested = {case["alertname"] for test in CASES for case in test["alert_rule_test"]}
    fired = {
        case["alertname"]
        for test in CASES[1:]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert tested == fired == {rule["alert"] for rule in rules()}  # every alert, both ways
    unit = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": CASES}
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(unit, sort_keys=False))
    result = run(binary, "test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# --- structure ------------------------------------------------------------------------------


def test_every_rule_is_annotated_and_labelled() -> None:
    seen = set()
    for rule in rules():
        name = rule["alert"]
        assert name not in seen, f"{name} twice"
        seen.add(name)
        assert rule["labels"]["severity"] in SEVERITIES, name
        for key in ("summary", "description", "runbook"):
            assert str(rule["annotations"].get(key, "")).strip(), f"{name}: no {key}"


def test_the_scrape_config_points_at_both_services_and_the_rules() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"pixelcraft-gateway", "pixelcraft-upstream"}
    defaults = {
        "pixelcraft-gateway": GatewaySettings.model_fields["gateway_admin_port"].default,
        "pixelcraft-upstream": UpstreamSettings.model_fields["upstream_port"].default,
    }
    for name, job in jobs.items():
        assert job.get("metrics_path", "/metrics") == "/metrics"
        targets = [t for static in job["static_configs"] for t in static["targets"]]
        assert targets == [f"127.0.0.1:{defaults[name]}"]


# --- every name is exported -----------------------------------------------------------------


def tls_available() -> bool:
    return "gateway_tls_cert_file" in GatewaySettings.model_fields


Families = dict[str, tuple[str, list[dict[str, str]]]]


def families(text: str) -> Families:
    """name -> (type, label sets of its samples), under every name a query can use."""
    found: Families = {}
    for family in text_string_to_metric_families(text):
        labels = [dict(sample.labels) for sample in family.samples]
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
        names = [family.name, *(family.name + s for s in suffixes.get(family.type, []))]
        names += [sample.name for sample in family.samples]
        for name in names:
            found.setdefault(name, (family.type, labels))
    return found


@pytest.fixture
async def exported(
    aiohttp_client: Any, database_url: str, gateway_process: GatewayStarter, tmp_path: Path
) -> AsyncIterator[Families]:
    """The metrics of a real chat service, and of a real gateway (a process, with TLS when its
    code is there) in front of it after a streamed chat, a listing and a 404."""
    settings = UpstreamSettings(
        _env_file=None,
        database_url=database_url,
        upstream_llm_provider="local",
        upstream_local_token_delay=0,
        db_pool_min_size=1,
        db_pool_max_size=3,
    )
    upstream = await aiohttp_client(create_upstream(settings))
    env = {
        "GATEWAY_RATELIMIT_CONFIG": ROOT / "config" / "ratelimits.toml",
        "GATEWAY_USER_ID_HEADER": "trusted",  # the production default
        "GATEWAY_DRAIN_SECONDS": "1",
    }
    if tls_available():
        cert_file, key_file = dev_certificate(tmp_path)
        env |= {"GATEWAY_TLS_CERT_FILE": cert_file, "GATEWAY_TLS_KEY_FILE": key_file}
    gateway = await gateway_process(str(upstream.make_url("")).rstrip("/"), **env)
    base = gateway.https if tls_available() else gateway.url
    admin = f"{gateway.admin_url}/metrics"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as session:
        user = {"X-User-Id": f"metrics-{uuid.uuid4().hex[:8]}"}
        async with session.post(f"{base}/v1/chat", json={"message": "hi"}, headers=user) as r:
            assert r.status == 200
            await r.read()
        async with session.get(f"{base}/v1/conversations", headers=user) as r:
            assert r.status == 200
        async with session.get(f"{base}/metrics", headers=user) as r:
            assert r.status == 404  # the chat service's /metrics is not public
        async with session.get(admin) as r:
            gateway_text = await r.text()
    upstream_text = await (await upstream.get("/metrics")).text()
    yield {**families(upstream_text), **families(gateway_text)}
    assert await gateway.stop() == 0


def used_names() -> Iterator[tuple[str, str]]:
    """(where, metric name) for every name in an expression or annotation of a rule."""
    for rule in rules():
        texts = [("expr", rule["expr"]), *rule.get("annotations", {}).items()]
        for where, text in texts:
            for name in METRIC.findall(re.sub(r'"[^"]*"', '""', text) if where == "expr" else text):
                yield f"{rule['alert']} {where}", name
            if where == "expr" and re.search(r"\bup\{", text):
                yield f"{rule['alert']} {where}", "up"


async def test_every_metric_the_rules_name_is_exported(exported: Families) -> None:
    missing: dict[str, str] = {}
    for where, name in used_names():
        if name in SYNTHETIC or name in exported:
            continue
        if name in TLS_METRICS and not tls_available():
            continue  # the other half of the contract lands with gateway/tls/certificates.py
        missing.setdefault(name, where)
    assert missing == {}


def selector_problems(where: str, expr: str, exported: Families) -> list[str]:
    """Labels (and the checked label values) that a query's selectors match but no exported
    series has: a typo there silently matches nothing."""
    problems = []
    for name, matchers in SELECTOR.findall(expr):
        if name in SYNTHETIC or name not in exported:
            continue
        _, samples = exported[name]
        for label, op, value in MATCHER.findall(matchers):
            if label in TARGET_LABELS or not samples:
                continue  # a labelled metric with no samples yet says nothing about labels
            values = {sample[label] for sample in samples if label in sample}
            if not values:
                problems.append(f"{where}: {name} has no label {label}")
            elif op in ("=", "!=") and label in CHECKED_VALUES and value not in values:
                problems.append(f"{where}: no {name}{{{label}={value!r}}}")
    return problems


async def test_label_names_and_values_the_rules_match_exist(exported: Families) -> None:
    problems = []
    for rule in rules():
        problems += selector_problems(rule["alert"], rule["expr"], exported)
    assert problems == []
