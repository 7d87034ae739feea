"""nginx/pixelcraft.conf, as shipped (only its ports and paths replaced), in a real nginx in front
of a real gateway: `nginx -t` passes, the gateway sees the client's address through nginx, and a
Server-Sent Events stream flows through event by event."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devtools.services import free_port
from tests.conftest import GatewayStarter, wait_until
from tests.gateway.conftest import FakeUpstream
from tests.support.pebble import ROOT, make_ca, make_leaf, require_tool, write_pair
from tests.support.sse import events

CONFIG = ROOT / "nginx" / "pixelcraft.conf"
CLIENT = "127.0.0.2"  # Linux routes all of 127/8 to lo: a client address that is not nginx's

MAIN = """\
{user}worker_processes 1;
daemon off;
pid {home}/nginx.pid;
error_log {home}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {home}/access.log;
    client_body_temp_path {home}/tmp/body;
    proxy_temp_path {home}/tmp/proxy;
    fastcgi_temp_path {home}/tmp/fastcgi;
    uwsgi_temp_path {home}/tmp/uwsgi;
    scgi_temp_path {home}/tmp/scgi;
    include {site};
}}
"""


def render(text: str, replacements: dict[str, str]) -> str:
    """The shipped config with its deployment values replaced; each one must be there."""
    for old, new in replacements.items():
        assert old in text, f"{old!r} is no longer in {CONFIG.name}: update this test"
        text = text.replace(old, new)
    return text


@dataclass
class Nginx:
    home: Path
    binary: str
    http_port: int
    https_port: int
    webroot: Path

    @property
    def argv(self) -> list[str]:
        conf = self.home / "nginx.conf"
        return [self.binary, "-p", str(self.home), "-c", str(conf), "-e", str(self.home / "e.log")]


@pytest.fixture
def nginx(tmp_path: Path) -> Nginx:
    binary = require_tool("nginx")
    home = tmp_path / "nginx"
    (home / "tmp").mkdir(parents=True)
    webroot = tmp_path / "webroot"
    (webroot / ".well-known" / "acme-challenge").mkdir(parents=True)
    ca = make_ca()
    write_pair(make_leaf(ca, ("chat.example.com",)), home / "fullchain.pem", home / "privkey.pem")
    return Nginx(home, binary, free_port(), free_port(), webroot)


def configure(nginx: Nginx, gateway_port: int) -> None:
    site = render(
        CONFIG.read_text(),
        {
            "server 127.0.0.1:8080;": f"server 127.0.0.1:{gateway_port};",
            "listen 80;": f"listen 127.0.0.1:{nginx.http_port};",
            "listen [::]:80;": f"listen [::1]:{nginx.http_port};",
            "listen 443 ssl http2;": f"listen 127.0.0.1:{nginx.https_port} ssl http2;",
            "listen [::]:443 ssl http2;": f"listen [::1]:{nginx.https_port} ssl http2;",
            "/etc/letsencrypt/live/chat.example.com/": f"{nginx.home}/",
            "/var/www/letsencrypt": str(nginx.webroot),
        },
    )
    (nginx.home / "pixelcraft.conf").write_text(site)
    (nginx.home / "nginx.conf").write_text(
        MAIN.format(
            # As root the workers would drop to `nobody`, who cannot read our private temp dir.
            user="user root;\n" if os.geteuid() == 0 else "",
            home=nginx.home,
            site=nginx.home / "pixelcraft.conf",
        )
    )


@pytest.fixture
def running(nginx: Nginx) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            nginx.argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # graceful: the master stops its workers
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_nginx_accepts_the_config(nginx: Nginx) -> None:
    configure(nginx, free_port())
    result = subprocess.run(
        [*nginx.argv, "-t"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


async def test_through_nginx_client_address_and_streaming(
    nginx: Nginx,
    running: Callable[[], subprocess.Popen[bytes]],
    gateway_process: GatewayStarter,
    upstream: FakeUpstream,
) -> None:
    gateway = await gateway_process(
        upstream.url, GATEWAY_TRUSTED_PROXIES="127.0.0.1/32", GATEWAY_USER_ID_HEADER="trusted"
    )
    configure(nginx, int(gateway.url.rsplit(":", 1)[1]))
    proc = running()
    base = f"https://127.0.0.1:{nginx.https_port}"
    connector = aiohttp.TCPConnector(ssl=False, local_addr=(CLIENT, 0))
    async with aiohttp.ClientSession(connector=connector) as session:

        async def answers() -> bool:
            if proc.poll() is not None:
                log = (nginx.home / "e.log").read_text(errors="replace")
                raise AssertionError(f"nginx exited {proc.returncode}: {log}")
            try:
                async with session.get(f"{base}/healthz") as resp:
                    return resp.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await wait_until(answers, within=15)

        # The client's address reaches the gateway through nginx; spoofed headers do not (nginx
        # is a trusted proxy, so an X-User-Id it passed on would be believed).
        spoofed = {"X-Forwarded-For": "6.6.6.6", "X-User-Id": "alice"}
        async with session.get(f"{base}/echo/who", headers=spoofed) as resp:
            assert resp.status == 200
            assert resp.headers["Strict-Transport-Security"] == "max-age=63072000"
            seen: dict[str, Any] = {}
            for name, value in (await resp.json())["headers"]:
                seen.setdefault(name.lower(), []).append(value)
        assert seen["x-user-id"] == [f"ip:{CLIENT}"]
        assert seen["x-forwarded-for"] == [f"{CLIENT}, 127.0.0.1"]
        assert seen["x-forwarded-proto"] == ["https"]
        assert resp.headers["RateLimit-Policy"]  # limited, per CLIENT's address

        # Server-Sent Events, one at a time: each arrives before the next is even written.
        async with session.get(f"{base}/sse") as resp:
            assert resp.status == 200
            ticks = events(resp).__aiter__()
            for item in ("one", "two", "three"):
                upstream.state.events.put_nowait(item)
                assert await asyncio.wait_for(anext(ticks), 10) == ("tick", item)
            upstream.state.events.put_nowait(None)
            with pytest.raises(StopAsyncIteration):
                await asyncio.wait_for(anext(ticks), 10)

        # Port 80: ACME challenges from the webroot, everything else 308 to HTTPS.
        (nginx.webroot / ".well-known" / "acme-challenge" / "tok-1").write_text("tok-1.key")
        http = f"http://127.0.0.1:{nginx.http_port}"
        async with session.get(f"{http}/.well-known/acme-challenge/tok-1") as resp:
            assert (resp.status, await resp.text()) == (200, "tok-1.key")
        async with session.post(
            f"{http}/v1/chat?x=1",
            headers={"Host": "chat.example.com"},
            allow_redirects=False,
        ) as resp:
            assert resp.status == 308
            assert resp.headers["Location"] == "https://chat.example.com/v1/chat?x=1"
