"""deploy/kubernetes: every manifest is valid against the Kubernetes API schemas (bundled by
kubernetes-validate: no network), and the facts that would break silently hold: only the gateway's
public ports are exposed, the chat service stays on the pod's loopback where the gateway looks for
it, every variable set is a setting of its container's service and validates, the probes name
routes that exist, the policy file is config/ratelimits.toml, and shutdown fits the grace period."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from pydantic_settings import BaseSettings

from gateway.edge.routes import public_routes
from gateway.settings import GatewaySettings
from tests.test_docs import variables
from upstream.app import create_app as create_upstream
from upstream.settings import UpstreamSettings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes release still commonly run and the newest the validator knows.
VERSIONS = ("1.29", "1.37")
SETTINGS: dict[str, type[BaseSettings]] = {"gateway": GatewaySettings, "upstream": UpstreamSettings}
PLACEHOLDER = "CHANGE-ME"


def kustomization() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return loaded


def documents() -> list[dict[str, Any]]:
    """Every object of every file kustomization.yaml lists, in order."""
    found = []
    for name in kustomization()["resources"]:
        found += [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]
    return found


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [
        d
        for d in documents()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(matches) == 1, f"{kind} {name}: {len(matches)} found"
    return matches[0]


def pod() -> dict[str, Any]:
    spec: dict[str, Any] = one("Deployment")["spec"]["template"]["spec"]
    return spec


def container(name: str) -> dict[str, Any]:
    (found,) = [c for c in pod()["containers"] if c["name"] == name]
    return cast(dict[str, Any], found)


def config_env(name: str) -> dict[str, str]:
    """The variables a container gets from ConfigMaps (envFrom)."""
    env: dict[str, str] = {}
    for source in container(name).get("envFrom", []):
        assert set(source) == {"configMapRef"}, f"{name}: only ConfigMaps are envFrom sources"
        env |= one("ConfigMap", source["configMapRef"]["name"])["data"]
    return env


def environment(name: str) -> dict[str, str]:
    """Everything a container's environment holds: ConfigMaps, then env (secrets resolved to
    the Secret's placeholder values)."""
    env = config_env(name)
    for var in container(name).get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = one("Secret", ref["name"])["stringData"][ref["key"]]
    return env


def mount_of(container_name: str, volume: str) -> dict[str, Any]:
    (found,) = [m for m in container(container_name)["volumeMounts"] if m["name"] == volume]
    return cast(dict[str, Any], found)


def volume(name: str) -> dict[str, Any]:
    (found,) = [v for v in pod()["volumes"] if v["name"] == name]
    return cast(dict[str, Any], found)


def exec_code(probe: dict[str, Any]) -> str:
    """The Python a `python -c` exec probe or hook runs."""
    command = probe["exec"]["command"]
    assert command[:2] == ["python", "-c"], command
    code: str = command[2]
    compile(code, "<probe>", "exec")  # at least it parses
    return code


# --- schema -----------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    listed = set(kustomization()["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(version: str) -> None:
    problems = []
    for doc in documents():
        try:  # strict: an unknown or misplaced field is an error, not ignored
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            problems.append(f"{doc['kind']}/{doc['metadata']['name']} {where}: {exc.message}")
    assert problems == []


def test_selectors_match_the_pods() -> None:
    deployment = one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (
        deployment["spec"]["selector"]["matchLabels"],
        one("Service")["spec"]["selector"],
        one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()
    assert one("PodDisruptionBudget")["spec"]["minAvailable"] < deployment["spec"]["replicas"]


# --- what the Service exposes and where the chat service listens -------------------------------


def test_the_service_exposes_only_the_gateways_public_ports() -> None:
    env = environment("gateway")
    public = {int(env["GATEWAY_HTTP_PORT"]), int(env["GATEWAY_HTTPS_PORT"])}
    ports = {p["name"]: p["containerPort"] for p in container("gateway")["ports"]}
    targets = set()
    for port in one("Service")["spec"]["ports"]:
        target = port["targetPort"]
        targets.add(ports[target] if isinstance(target, str) else target)
    assert targets == public
    assert int(env["GATEWAY_ADMIN_PORT"]) not in targets
    assert "ports" not in container("upstream")  # nothing of the chat service is declared


def test_the_chat_service_binds_loopback_where_the_gateway_forwards() -> None:
    upstream = environment("upstream")
    assert upstream["UPSTREAM_HOST"] == "127.0.0.1"
    target = urlsplit(environment("gateway")["GATEWAY_UPSTREAM_URL"])
    assert (target.scheme, target.hostname, target.port) == (
        "http",
        "127.0.0.1",
        int(upstream["UPSTREAM_PORT"]),
    )


def test_both_containers_run_the_image_of_this_version() -> None:
    image = f"pixelcraft-gateway:{importlib.metadata.version('pixelcraft-gateway')}"
    for name in SETTINGS:
        assert container(name)["image"] == image
        assert container(name)["command"] == ["python", "-m", name]


# --- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SETTINGS)
def test_every_variable_set_is_a_setting_of_its_service(name: str) -> None:
    assert set(environment(name)) - set(variables(SETTINGS[name])) == set()


@pytest.mark.parametrize("name", SETTINGS)
def test_the_environment_validates(name: str, clean_env: pytest.MonkeyPatch) -> None:
    for key, value in environment(name).items():
        clean_env.setenv(key, value)
    SETTINGS[name](_env_file=None)


def test_secrets_are_placeholders_and_every_reference_resolves() -> None:
    secret = one("Secret")
    assert "data" not in secret
    assert all(PLACEHOLDER in value for value in secret["stringData"].values())
    referenced = {
        var["valueFrom"]["secretKeyRef"]["key"]
        for name in SETTINGS
        for var in container(name).get("env", [])
        if "valueFrom" in var
    }
    assert referenced == set(secret["stringData"])
    # A secret never sits in a ConfigMap.
    for name in SETTINGS:
        assert set(config_env(name)).isdisjoint(secret["stringData"])


def test_limits_are_divided_among_the_replicas() -> None:
    replicas = one("Deployment")["spec"]["replicas"]
    assert int(environment("gateway")["GATEWAY_RATELIMIT_REPLICAS"]) == replicas


# --- files ----------------------------------------------------------------------------------


def test_the_policy_file_is_config_ratelimits_toml_where_the_gateway_reads_it() -> None:
    policies = volume("ratelimits")["configMap"]
    data = one("ConfigMap", policies["name"])["data"]
    assert data == {"ratelimits.toml": (ROOT / "config" / "ratelimits.toml").read_text()}
    mount = mount_of("gateway", "ratelimits")
    assert "subPath" not in mount  # a subPath mount is never updated
    path = Path(environment("gateway")["GATEWAY_RATELIMIT_CONFIG"])
    assert (path.parent, path.name) == (Path(mount["mountPath"]), "ratelimits.toml")


def test_the_certificate_comes_from_a_tls_secret_mounted_as_a_directory() -> None:
    env = environment("gateway")
    mount = mount_of("gateway", "tls")
    assert "subPath" not in mount
    assert volume("tls")["secret"]["secretName"] == "pixelcraft-tls"
    for variable, key in (
        ("GATEWAY_TLS_CERT_FILE", "tls.crt"),
        ("GATEWAY_TLS_KEY_FILE", "tls.key"),
    ):
        assert Path(env[variable]) == Path(mount["mountPath"]) / key
    assert float(env["GATEWAY_TLS_POLL_SECONDS"]) > 0  # nothing signals the pod on renewal


def test_the_containers_run_read_only_and_unprivileged_with_a_writable_tmp() -> None:
    assert pod()["securityContext"]["runAsNonRoot"] is True
    assert volume("tmp")["emptyDir"] is not None
    for name in SETTINGS:
        context = container(name)["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert mount_of(name, "tmp")["mountPath"] == "/tmp"
        assert container(name)["resources"]["limits"].keys() == {"cpu", "memory"}


# --- probes ---------------------------------------------------------------------------------


def probes(name: str) -> dict[str, dict[str, Any]]:
    return {
        kind: container(name)[kind] for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }


def test_gateway_probes_hit_its_own_routes_on_the_port_serving_them() -> None:
    routes = public_routes("PixelCraft", None).exact
    env = environment("gateway")
    ports = {p["name"]: p["containerPort"] for p in container("gateway")["ports"]}
    tls = bool(env.get("GATEWAY_TLS_CERT_FILE"))
    expected = {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    for kind, probe in probes("gateway").items():
        get = probe["httpGet"]
        assert get["path"] == expected[kind]
        assert get["path"] in routes
        # With TLS the HTTP port answers nothing but challenges and redirects.
        port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
        served = env["GATEWAY_HTTPS_PORT"] if tls else env["GATEWAY_HTTP_PORT"]
        assert (port, get.get("scheme", "HTTP")) == (int(served), "HTTPS" if tls else "HTTP")


def test_chat_service_probes_hit_its_routes_on_its_loopback_port() -> None:
    env = environment("upstream")
    app = create_upstream(
        UpstreamSettings(
            _env_file=None, database_url="postgresql://x/y", upstream_llm_provider="local"
        )
    )
    gets = {
        route.resource.canonical
        for route in app.router.routes()
        if route.method == "GET" and route.resource is not None
    }
    expected = {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    for kind, probe in probes("upstream").items():
        (url,) = re.findall(r"'(http://[^']+)'", exec_code(probe))
        parts = urlsplit(url)
        assert (parts.hostname, parts.port) == ("127.0.0.1", int(env["UPSTREAM_PORT"]))
        assert parts.path == expected[kind]
        assert parts.path in gets


# --- shutdown -------------------------------------------------------------------------------


def test_the_grace_period_covers_the_pause_and_the_drain() -> None:
    grace = pod()["terminationGracePeriodSeconds"]
    (pause,) = re.findall(
        r"time\.sleep\((\d+)\)", exec_code(container("gateway")["lifecycle"]["preStop"])
    )
    drain = float(environment("gateway")["GATEWAY_DRAIN_SECONDS"])
    assert grace > int(pause) + drain
    # The chat service waits for the gateway's admin port to close, within the grace period.
    code = exec_code(container("upstream")["lifecycle"]["preStop"])
    (bound,) = re.findall(r"time\.monotonic\(\) \+ (\d+)", code)
    assert int(pause) + drain <= int(bound) < grace
    (port,) = re.findall(r'\("127\.0\.0\.1", (\d+)\)', code)
    assert int(port) == int(environment("gateway")["GATEWAY_ADMIN_PORT"])


def test_prometheus_scrapes_the_admin_port_on_the_pods_address() -> None:
    annotations = one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    env = environment("gateway")
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == env["GATEWAY_ADMIN_PORT"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert env["GATEWAY_ADMIN_HOST"] not in ("127.0.0.1", "::1", "localhost")
    ports = {p["name"]: p["containerPort"] for p in container("gateway")["ports"]}
    assert ports["admin"] == int(env["GATEWAY_ADMIN_PORT"])


# --- resources ------------------------------------------------------------------------------

QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi)?$")  # the suffixes used here
SCALE = {None: 1.0, "m": 0.001, "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30}


def quantity(text: str | int) -> float:
    """A Kubernetes quantity (the schema takes any string; kubectl would refuse a bad one)."""
    match = QUANTITY.match(str(text))
    assert match is not None, f"not a quantity: {text!r}"
    return float(match.group(1)) * SCALE[match.group(2)]


def test_resources_are_quantities_and_the_gateway_fits_its_body_buffers(
    clean_env: pytest.MonkeyPatch,
) -> None:
    for name in SETTINGS:
        resources = container(name)["resources"]
        for kind in ("cpu", "memory"):
            request, limit = resources["requests"][kind], resources["limits"][kind]
            assert 0 < quantity(request) <= quantity(limit), f"{name} {kind}"
    for key, value in environment("gateway").items():
        clean_env.setenv(key, value)
    buffers = GatewaySettings(_env_file=None).gateway_client_body_buffer_total_bytes
    workers = GatewaySettings(_env_file=None).gateway_workers
    # Request bodies held at once, per worker, must fit in the memory limit with room to spare.
    limit = quantity(container("gateway")["resources"]["limits"]["memory"])
    assert buffers * workers < limit / 2
