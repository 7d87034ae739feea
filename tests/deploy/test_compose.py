"""compose.yaml: its structure as Compose resolves it, and the gateway + chat service brought up
with podman-compose (compose.test.yaml: the image built here, the host's network, this machine's
Redis and PostgreSQL, the fake OpenAI API), a chat streamed through, then taken down.

No registry is reachable from these machines, so redis:7, postgres:16 and certbot/certbot are
not pulled: those services are checked as configuration only.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from devtools.services import dev_certificate, free_port
from tests.conftest import RUN_ID, wait_until
from tests.deploy.conftest import ROOT, Podman, answers
from tests.fakes.openai_server import FakeOpenAIServer, reply
from tests.support.sse import events

pytestmark = pytest.mark.timeout(600)

COMPOSE = Path(sys.executable).with_name("podman-compose")
TOKENS = ("Composed", " and", " streamed", ".")
API_KEY = "sk-test-" + uuid.uuid4().hex
DEPLOY_HOOK = ROOT / "config" / "compose" / "certbot-deploy-hook.sh"


def compose_command() -> list[str]:
    if not COMPOSE.exists():
        pytest.skip(
            f"podman-compose is not installed in {COMPOSE.parent} (the `test` extra pins it)"
        )
    return [str(COMPOSE)]


def compose_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment without any PIXELCRAFT_* of the caller's, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELCRAFT_")}
    env["PIXELCRAFT_DB_PASSWORD"] = "not-a-secret-placeholder"
    env.update(extra or {})
    return env


def resolved(*args: str) -> dict[str, Any]:
    """`podman-compose ... config`: the file as Compose resolves it (merges, anchors, variables)."""
    done = subprocess.run(
        [*compose_command(), "--env-file", os.devnull, *args, "config"],
        cwd=ROOT,
        env=compose_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


def test_compose_file_structure() -> None:
    config = resolved("-f", "compose.yaml", "--profile", "tls")
    services = config["services"]
    assert set(services) == {"gateway", "upstream", "redis", "postgres", "certbot"}
    assert services["certbot"]["profiles"] == ["tls"]
    for name in ("gateway", "upstream", "redis", "postgres"):
        assert "profiles" not in services[name], name

    gateway, upstream = services["gateway"], services["upstream"]
    # One image: the default command is the gateway, the chat service overrides it.
    assert gateway["image"] == upstream["image"] == "localhost/pixelcraft-gateway:latest"
    assert "command" not in gateway
    assert upstream["command"] == ["python", "-m", "upstream"]
    # Health-based start order (the image's HEALTHCHECK serves gateway and upstream).
    assert gateway["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "upstream": {"condition": "service_healthy"},
    }
    assert upstream["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["certbot"]["depends_on"] == {"gateway": {"condition": "service_healthy"}}
    for name in ("redis", "postgres"):
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    # Only the gateway is published.
    assert {name for name, service in services.items() if service.get("ports")} == {"gateway"}
    assert gateway["ports"] == ["8080:8080", "8443:8443"]

    # Named volumes: each one used is declared, and data lives in them.
    declared = set(config["volumes"])
    assert declared == {"postgres-data", "redis-data", "letsencrypt", "acme-webroot", "tls"}
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source in declared or source.startswith("./"), volume
    assert "postgres-data:/var/lib/postgresql/data" in services["postgres"]["volumes"]

    # Environment: the env files exist; secrets come from the caller's .env, never from a file
    # in the repository.
    for name in ("gateway", "upstream"):
        for env_file in services[name]["env_file"]:
            for line in (ROOT / env_file).read_text().splitlines():
                variable = line.partition("=")[0]
                if line.startswith("#") or not variable:
                    continue
                assert not variable.endswith(("PASSWORD", "SECRET", "API_KEY")), line
                assert "@" not in line.partition("=")[2], f"credentials in a URL: {line}"
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "not-a-secret-placeholder"
    assert upstream["environment"]["DATABASE_URL"] == (
        "postgresql://pixelcraft:not-a-secret-placeholder@postgres:5432/pixelcraft"
    )


def test_compose_refuses_to_start_without_a_database_password() -> None:
    env = compose_env()
    del env["PIXELCRAFT_DB_PASSWORD"]
    done = subprocess.run(
        [*compose_command(), "--env-file", os.devnull, "-f", "compose.yaml", "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "PIXELCRAFT_DB_PASSWORD" in done.stderr


def test_certbot_deploy_hook_installs_one_readable_pem(tmp_path: Path) -> None:
    import ssl

    lineage = tmp_path / "live" / "chat.example.com"
    cert, key = dev_certificate(lineage)
    cert.rename(lineage / "fullchain.pem")
    key.rename(lineage / "privkey.pem")
    tls = tmp_path / "tls"
    tls.mkdir()
    env = dict(
        os.environ,
        RENEWED_LINEAGE=str(lineage),
        PIXELCRAFT_TLS_DIR=str(tls),
        PIXELCRAFT_TLS_OWNER=f"{os.getuid()}:{os.getgid()}",
    )
    subprocess.run(["sh", str(DEPLOY_HOOK)], env=env, check=True, timeout=30)
    installed = tls / "gateway.pem"
    assert [p.name for p in tls.iterdir()] == ["gateway.pem"]  # no temporary file left
    assert stat.S_IMODE(installed.stat().st_mode) == 0o640
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(installed, installed)  # the key and the chain, matching


@pytest.fixture
def compose_project(podman_env: dict[str, str]) -> Iterator[tuple[list[str], dict[str, str]]]:
    """(command prefix, environment) for one Compose project of this test; `down -v` after."""
    project = f"pctest{RUN_ID}{uuid.uuid4().hex[:6]}"
    command = [*compose_command(), "--env-file", os.devnull, "-p", project]
    command += ["-f", "compose.yaml", "-f", "compose.test.yaml"]
    env = compose_env({"CONTAINERS_CONF": podman_env["CONTAINERS_CONF"]})
    yield command, env
    subprocess.run(
        [*command, "down", "-v", "-t", "10"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )


async def test_compose_brings_up_gateway_and_upstream_and_streams_a_chat(
    image: str,
    podman: Podman,
    compose_project: tuple[list[str], dict[str, str]],
    image_database_url: str,
    redis_url: str,
    key_prefix: str,
    fake_openai: FakeOpenAIServer,
) -> None:
    command, env = compose_project
    fake_openai.state.api_key = API_KEY
    fake_openai.state.push(reply(TOKENS, delay=0.1))
    upstream_port, http_port, admin_port = free_port(), free_port(), free_port()
    env.update(
        PIXELCRAFT_IMAGE=image,
        PIXELCRAFT_HTTP_PORT=str(http_port),
        PIXELCRAFT_OPENAI_API_KEY=API_KEY,
        PIXELCRAFT_TEST_UPSTREAM_PORT=str(upstream_port),
        PIXELCRAFT_TEST_ADMIN_PORT=str(admin_port),
        PIXELCRAFT_TEST_REDIS_URL=redis_url,
        PIXELCRAFT_TEST_REDIS_KEY_PREFIX=key_prefix,
        PIXELCRAFT_TEST_DATABASE_URL=image_database_url,
        PIXELCRAFT_TEST_OPENAI_BASE_URL=fake_openai.base_url,
    )

    def compose(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command, *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )

    up = await asyncio.to_thread(compose, "up", "-d", "gateway", "upstream")
    assert up.returncode == 0, up.stderr[-3000:]
    project = command[command.index("-p") + 1]
    gateway, upstream = f"{project}_gateway_1", f"{project}_upstream_1"

    async def healthy() -> bool:
        # podman runs HEALTHCHECKs on a systemd timer, which these machines lack: run them here.
        states = [(await podman.health(name)).get("Status") for name in (gateway, upstream)]
        return states == ["healthy", "healthy"]

    try:
        await wait_until(healthy, within=60, interval=0.5)
    except AssertionError as exc:
        logs = f"{podman.logs(upstream)}\n{podman.logs(gateway)}"
        raise AssertionError(f"{exc}: not both healthy\n{logs}") from None

    # What compose.yaml asks for holds in the running containers.
    for name in (gateway, upstream):
        host_config = podman.inspect(name)["HostConfig"]
        assert host_config["ReadonlyRootfs"] is True, name
        assert await podman.process_uid(name) == 10001

    base = f"http://127.0.0.1:{http_port}"
    async with aiohttp.ClientSession() as session:
        assert await answers(session, f"{base}/readyz")
        headers = {"X-User-Id": f"compose-{RUN_ID}", "Content-Type": "application/json"}
        async with session.post(
            f"{base}/v1/chat", json={"message": "Compose?"}, headers=headers
        ) as resp:
            assert resp.status == 200, await resp.text()
            received = [(name, data) async for name, data in events(resp)]
    assert [data["content"] for name, data in received if name == "delta"] == list(TOKENS)
    assert received[-1][0] == "done"
    assert fake_openai.state.requests[-1].completed

    def leftovers() -> tuple[list[str], list[str]]:
        """This project's containers and volumes (Compose prefixes their names with it)."""
        names = podman.run("ps", "--all", "--format", "{{.Names}}").split()
        volumes = podman.run("volume", "ls", "--format", "{{.Name}}").split()
        mine = f"{project}_"
        return [n for n in names if n.startswith(mine)], [v for v in volumes if v.startswith(mine)]

    before = leftovers()
    assert sorted(before[0]) == sorted([gateway, upstream])
    assert f"{project}_tls" in before[1]  # the gateway's named volumes were created

    down = await asyncio.to_thread(compose, "down", "-v", "-t", "10")
    assert down.returncode == 0, down.stderr[-3000:]
    assert leftovers() == ([], [])
