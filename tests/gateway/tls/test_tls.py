"""TLS end to end: certbot gets a certificate from a local pebble through the gateway's HTTP port,
the gateway serves it, renewal swaps it under load, bad files never break serving.

Everything runs for real on loopback: pebble (with its DNS at a local pebble-challtestsrv),
certbot, the gateway as a process, Python's ssl as the TLS client, sslyze for the Mozilla profile.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import signal
import ssl
import stat
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from pydantic import ValidationError
from yarl import URL

from devtools.services import free_port
from gateway.serving.server import listen_addresses
from gateway.settings import GatewaySettings
from gateway.tls.acme import https_location
from gateway.tls.certificates import CIPHERS, load_pair
from pixelcraft.boot import error_lines
from tests.conftest import GatewayStarter, service_env, wait_until
from tests.gateway.conftest import FakeUpstream
from tests.support.pebble import (
    ROOT,
    Issued,
    Pebble,
    client_context,
    handshake,
    make_ca,
    make_leaf,
    require_tool,
    serial_of_pem,
    write_pair,
)
from tests.support.processes import Launcher, Service
from tests.support.sse import events

DOMAIN = "gateway.pixelcraft.test"
SCRIPTS = ROOT / "scripts"
# Hooks run by certbot here must never find a real gateway on this machine.
HOOK_ISOLATION = {"PIXELCRAFT_GATEWAY_UNIT": "pixelcraft-test-absent.service"}


# --- gateway processes ----------------------------------------------------------------------


StartGateway = GatewayStarter


@pytest.fixture
def start_gateway(gateway_process: GatewayStarter) -> StartGateway:
    """`gateway_process` without rate limits (the load below is not what limits are for) and
    with a 1 s drain; give `GATEWAY_TLS_*` and the like."""

    async def start(upstream_url: str, **options: Any) -> Service:
        defaults = {"GATEWAY_RATELIMIT_ENABLED": "false", "GATEWAY_DRAIN_SECONDS": "1"}
        return await gateway_process(upstream_url, **{**defaults, **options})

    return start


async def tls_metrics(gateway: Service) -> dict[str, float]:
    """The gateway_tls_* samples on its admin port."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{gateway.admin_url}/metrics") as resp,
    ):
        text = await resp.text()
    samples = {}
    for line in text.splitlines():
        if line.startswith("gateway_tls_"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


# --- pebble and the certificate it issues (one of each for the module) ---------------------


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pebble]:
    """pebble validating http-01 on one port, which every gateway of this module listens on."""
    require_tool("certbot")
    server = Pebble(tmp_path_factory.mktemp("pebble"), http_port=free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()


@dataclass
class Lineage:
    live: Path
    webroot: Path

    @property
    def fullchain(self) -> Path:
        return self.live / "fullchain.pem"

    @property
    def privkey(self) -> Path:
        return self.live / "privkey.pem"


@pytest.fixture(scope="module")
def issued(
    pebble: Pebble, redis_url: str, key_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Lineage:
    """scripts/cert-issue against pebble, its http-01 challenge served by a gateway without TLS
    (how the first certificate is obtained)."""
    webroot = tmp_path_factory.mktemp("acme-webroot")
    argv = [str(SCRIPTS / "cert-issue"), "-d", DOMAIN, "-w", str(webroot)]
    argv += ["--server", pebble.directory]
    certbot_env = pebble.certbot_env(GATEWAY_PID_FILE=str(webroot / "absent.pid"), **HOOK_ISOLATION)

    async def issue() -> tuple[subprocess.CompletedProcess[str], str]:
        async with Launcher(tmp_path_factory.mktemp("issuing-gateway")) as launcher:
            gateway = await launcher.gateway(
                redis_url=redis_url,
                upstream_url="http://127.0.0.1:9",
                key_prefix=f"{key_prefix}issue:",
                http_port=pebble.http_port,
                GATEWAY_RATELIMIT_ENABLED="false",
                GATEWAY_ACME_WEBROOT=webroot,
            )
            result = await asyncio.to_thread(
                lambda: subprocess.run(
                    [*argv, "--", *pebble.certbot_options()],
                    env=certbot_env,
                    capture_output=True,
                    text=True,
                    timeout=90,
                )
            )
            await gateway.stop(within=15)
            await gateway.reader
            return result, gateway.log()

    result, log = asyncio.run(issue())
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{pebble.logs()}"
    # The CA fetched the challenge from the gateway (over ::1 first, as pebble prefers IPv6).
    assert re.search(r"GET /\.well-known/acme-challenge/[A-Za-z0-9_-]+ 200", log), log
    lineage = Lineage(pebble.live(DOMAIN), webroot)
    assert lineage.fullchain.is_file() and lineage.privkey.is_file()
    return lineage


async def tls_gateway_from(
    start_gateway: StartGateway, lineage: Lineage, pebble: Pebble, upstream_url: str, **env: Any
) -> Service:
    return await start_gateway(
        upstream_url,
        http_port=pebble.http_port,
        GATEWAY_TLS_CERT_FILE=lineage.fullchain,
        GATEWAY_TLS_KEY_FILE=lineage.privkey,
        GATEWAY_ACME_WEBROOT=lineage.webroot,
        **env,
    )


class KeepAlive:
    """One TLS connection, HTTP/1.1 requests one after another on it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        self.serial = x509.load_der_x509_certificate(der).serial_number

    @classmethod
    async def open(cls, port: int, context: ssl.SSLContext, server_name: str) -> KeepAlive:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname=server_name
        )
        return cls(reader, writer)

    async def get(self, path: str) -> int:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n".encode())
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode().split("\r\n")
        length = next(
            int(v) for k, _, v in (h.partition(": ") for h in lines) if k == "Content-Length"
        )
        await asyncio.wait_for(self.reader.readexactly(length), 10)
        assert "Connection: close" not in lines
        return int(lines[0].split()[1])

    def close(self) -> None:
        self.writer.close()


async def run_script(*argv: str | Path, env: dict[str, str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        *map(str, argv), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"{argv[0]} exited {proc.returncode}:\n{text}"
    return text


# --- issue, serve, renew --------------------------------------------------------------------


async def test_certbot_certificate_is_served_over_https(
    issued: Lineage, pebble: Pebble, start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    gateway = await tls_gateway_from(start_gateway, issued, pebble, upstream.url)
    verifying = client_context(pebble.root_file)  # the chain must lead to pebble's root

    serial, version, alpn = await handshake(gateway.https_port, verifying, server_name=DOMAIN)
    assert serial == serial_of_pem(issued.live / "cert.pem")
    assert (version, alpn) == ("TLSv1.3", "http/1.1")

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=verifying)) as session:
        async with session.get(f"{gateway.https}/echo/x") as resp:
            assert resp.status == 200
            assert resp.headers["Strict-Transport-Security"] == "max-age=63072000"
            seen = dict((await resp.json())["headers"])
        assert seen["X-Forwarded-Proto"] == "https"
        async with session.get(f"{gateway.http}/echo/x", allow_redirects=False) as resp:
            assert resp.status == 308
            assert "Strict-Transport-Security" not in resp.headers  # RFC 6797 §7.2

    cert = x509.load_pem_x509_certificates(issued.fullchain.read_bytes())[0]
    samples = await tls_metrics(gateway)
    expiry = samples["gateway_tls_certificate_expiry_timestamp_seconds"]
    assert expiry == cert.not_valid_after_utc.timestamp()


async def test_renewal_switches_new_handshakes_and_keeps_open_connections(
    issued: Lineage, pebble: Pebble, start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    pid_file = issued.webroot.parent / f"gateway-{os.getpid()}.pid"
    gateway = await tls_gateway_from(
        start_gateway, issued, pebble, upstream.url, GATEWAY_PID_FILE=pid_file
    )
    verifying = client_context(pebble.root_file)
    old_serial = serial_of_pem(issued.live / "cert.pem")
    assert (await handshake(gateway.https_port, verifying, DOMAIN))[0] == old_serial
    install = issued.webroot.parent / f"tls-install-{os.getpid()}"
    install.mkdir()

    # Opened before the renewal: a keep-alive connection and an SSE stream.
    keepalive = await KeepAlive.open(gateway.https_port, verifying, DOMAIN)
    streaming = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=verifying))
    try:
        assert await keepalive.get("/echo/before") == 200
        assert keepalive.serial == old_serial
        stream = await streaming.get(f"{gateway.https}/sse")
        assert stream.status == 200
        ticks = events(stream).__aiter__()
        upstream.state.events.put_nowait("before")
        assert await asyncio.wait_for(anext(ticks), 10) == ("tick", "before")

        # A small load meanwhile: every request on a new connection (a new handshake).
        results: collections.Counter[str] = collections.Counter()
        stop = asyncio.Event()

        async def load() -> None:
            connector = aiohttp.TCPConnector(ssl=verifying, force_close=True)
            async with aiohttp.ClientSession(connector=connector) as session:
                while not stop.is_set():
                    try:
                        async with session.get(f"{gateway.https}/echo/load") as resp:
                            await resp.read()
                            results["ok" if resp.status == 200 else f"HTTP {resp.status}"] += 1
                    except (aiohttp.ClientError, OSError) as exc:
                        results[f"{type(exc).__name__}: {exc}"] += 1

        loaders = [asyncio.ensure_future(load()) for _ in range(4)]
        await wait_until(lambda: results["ok"] >= 8, within=10)

        output = await run_script(
            SCRIPTS / "cert-renew",
            "--force-renewal",
            "--",
            *pebble.certbot_options(),
            env=pebble.certbot_env(
                GATEWAY_PID_FILE=str(pid_file),
                PIXELCRAFT_TLS_INSTALL_DIR=str(install),
                **HOOK_ISOLATION,
            ),
        )
        assert f"sent SIGHUP to the gateway (pid {gateway.proc.pid}" in output
        new_serial = serial_of_pem(issued.live / "cert.pem")
        assert new_serial != old_serial
        # The hook also installed the renewed pair as one PEM, for a gateway that may not read
        # certbot's live/ (README, "TLS": file permissions).
        combined = install / f"{DOMAIN}.pem"
        assert load_pair(combined, combined)[1].serial == new_serial

        async def new_certificate_served() -> bool:
            return (await handshake(gateway.https_port, verifying, DOMAIN))[0] == new_serial

        await wait_until(new_certificate_served, within=10)
        before_stop = results["ok"]
        await wait_until(lambda: results["ok"] >= before_stop + 8, within=10)
        stop.set()
        await asyncio.gather(*loaders)
        assert set(results) == {"ok"}, results  # zero failed requests across the swap

        # The keep-alive connection opened before (old certificate) still works.
        assert await keepalive.get("/echo/after") == 200
        assert keepalive.serial == old_serial
        # The stream opened before goes on, event by event, and ends cleanly.
        upstream.state.events.put_nowait("after")
        assert await asyncio.wait_for(anext(ticks), 10) == ("tick", "after")
        upstream.state.events.put_nowait(None)
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(ticks), 10)
        stream.release()
    finally:
        keepalive.close()
        await streaming.close()

    samples = await tls_metrics(gateway)
    assert samples['gateway_tls_reloads_total{result="ok"}'] >= 1
    assert samples['gateway_tls_reloads_total{result="error"}'] == 0
    cert = x509.load_pem_x509_certificates(issued.fullchain.read_bytes())[0]
    assert samples["gateway_tls_certificate_expiry_timestamp_seconds"] == (
        cert.not_valid_after_utc.timestamp()
    )


async def test_tls_1_1_refused_and_mozilla_intermediate_per_sslyze(
    issued: Lineage, pebble: Pebble, start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    gateway = await tls_gateway_from(start_gateway, issued, pebble, upstream.url)

    def old_client(version: ssl.TLSVersion) -> ssl.SSLContext:
        context = client_context()
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # so this client really offers TLS 1.1
        with warnings.catch_warnings():  # TLSv1_1 is deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = context.maximum_version = version
        return context

    # Refused in the handshake: an alert, or (uvloop does not flush it) the connection reset.
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await handshake(gateway.https_port, old_client(ssl.TLSVersion.TLSv1_1))
    _, version, _ = await handshake(gateway.https_port, old_client(ssl.TLSVersion.TLSv1_2))
    assert version == "TLSv1.2"  # the same client is served once it speaks TLS 1.2

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sslyze",
        "--mozilla_config=intermediate",
        "--certinfo_ca_file",
        str(pebble.root_file),
        f"{DOMAIN}:{gateway.https_port}{{127.0.0.1}}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    report = out.decode(errors="replace")
    assert proc.returncode == 0, report
    assert "OK - Compliant" in report, report


# --- bad files, the poll, boot checks (self-made certificates: no CA needed) -----------------


@pytest.fixture
def ca() -> Issued:
    return make_ca()


@dataclass
class Files:
    cert: Path
    key: Path


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path / "fullchain.pem", tmp_path / "privkey.pem")


def counts(samples: dict[str, float]) -> tuple[float, float]:
    return (
        samples['gateway_tls_reloads_total{result="ok"}'],
        samples['gateway_tls_reloads_total{result="error"}'],
    )


def torn(data: bytes) -> bytes:
    return data[: len(data) // 2]


async def test_bad_files_keep_the_current_certificate(
    ca: Issued, files: Files, start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    first = make_leaf(ca)
    write_pair(first, files.cert, files.key, ca)
    gateway = await start_gateway(
        upstream.url, GATEWAY_TLS_CERT_FILE=files.cert, GATEWAY_TLS_KEY_FILE=files.key
    )
    verifying = client_context(_ca_file(ca, files.cert.parent))
    assert (await handshake(gateway.https_port, verifying))[0] == first.serial
    second = make_leaf(ca)
    chain = second.cert_pem + ca.cert_pem

    def set_files(cert: bytes | None, key: bytes | None) -> None:
        for path, data in ((files.cert, cert), (files.key, key)):
            if data is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(data)

    cases = {
        "torn certificate": (torn(chain), second.key_pem, "GATEWAY_TLS_CERT_FILE"),
        "torn chain": (second.cert_pem + torn(ca.cert_pem), second.key_pem, "CERT_FILE"),
        "torn key": (chain, torn(second.key_pem), "GATEWAY_TLS_KEY_FILE"),
        "empty certificate": (b"", second.key_pem, "GATEWAY_TLS_CERT_FILE"),
        "empty key": (chain, b"", "GATEWAY_TLS_KEY_FILE"),
        "new certificate, old key": (chain, first.key_pem, "does not match the certificate"),
        "missing certificate": (None, second.key_pem, "GATEWAY_TLS_CERT_FILE"),
        "missing key": (chain, None, "GATEWAY_TLS_KEY_FILE"),
        "expired certificate": (
            (expired := make_leaf(ca, expired=True)).cert_pem,
            expired.key_pem,
            "expired",
        ),
    }
    errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=verifying)) as session:
        for case, (cert, key, named) in cases.items():
            set_files(cert, key)
            gateway.proc.send_signal(signal.SIGHUP)
            errors += 1

            async def counted(expected: int = errors) -> bool:
                return counts(await tls_metrics(gateway)) == (0, expected)

            await wait_until(counted, within=10)
            assert (await handshake(gateway.https_port, verifying))[0] == first.serial, case
            async with session.get(f"{gateway.https}/echo/{errors}") as resp:
                assert resp.status == 200, case
            assert any(
                "not reloaded, keeping the current one" in line and named in line
                for line in gateway.output
            ), (case, gateway.log())
            gateway.output.clear()

        write_pair(second, files.cert, files.key, ca)
        gateway.proc.send_signal(signal.SIGHUP)

        async def reloaded() -> bool:
            return counts(await tls_metrics(gateway)) == (1, errors)

        await wait_until(reloaded, within=10)
        assert (await handshake(gateway.https_port, verifying))[0] == second.serial
    samples = await tls_metrics(gateway)
    expiry = samples["gateway_tls_certificate_expiry_timestamp_seconds"]
    assert expiry == second.cert.not_valid_after_utc.timestamp()


def _ca_file(ca: Issued, directory: Path) -> Path:
    path = directory / "ca.pem"
    path.write_bytes(ca.cert_pem)
    return path


async def test_poll_reloads_changed_files_without_a_signal(
    ca: Issued, files: Files, start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    first, second = make_leaf(ca), make_leaf(ca)
    write_pair(first, files.cert, files.key, ca)
    gateway = await start_gateway(
        upstream.url,
        GATEWAY_TLS_CERT_FILE=files.cert,
        GATEWAY_TLS_KEY_FILE=files.key,
        GATEWAY_TLS_POLL_SECONDS="0.1",
    )
    verifying = client_context(_ca_file(ca, files.cert.parent))

    # certbot's order: the certificate link switches first; a poll may see the new
    # certificate with the old key. That pair is refused, counted once, and not served.
    files.cert.write_bytes(second.cert_pem + ca.cert_pem)

    async def refused() -> bool:
        return counts(await tls_metrics(gateway)) == (0, 1)

    await wait_until(refused, within=10)
    assert (await handshake(gateway.https_port, verifying))[0] == first.serial
    files.key.write_bytes(second.key_pem)

    async def served() -> bool:
        return (await handshake(gateway.https_port, verifying))[0] == second.serial

    await wait_until(served, within=10)
    assert counts(await tls_metrics(gateway)) == (1, 1)


async def test_every_worker_reloads_on_sighup(
    ca: Issued, files: Files, start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    first, second = make_leaf(ca), make_leaf(ca)
    write_pair(first, files.cert, files.key, ca)
    pid_file = files.cert.parent / "gateway.pid"
    gateway = await start_gateway(
        upstream.url,
        GATEWAY_WORKERS="2",
        GATEWAY_PID_FILE=pid_file,
        GATEWAY_TLS_CERT_FILE=files.cert,
        GATEWAY_TLS_KEY_FILE=files.key,
    )
    verifying = client_context(_ca_file(ca, files.cert.parent))

    async def both_workers_up() -> bool:
        return (await tls_metrics(gateway)).get('gateway_tls_reloads_total{result="ok"}') == 0 and (
            len([line for line in gateway.output if "listening on https://127.0.0.1" in line]) == 2
        )

    await wait_until(both_workers_up, within=30)
    assert int(pid_file.read_text()) == gateway.proc.pid  # the supervisor's, which forwards
    write_pair(second, files.cert, files.key, ca)
    await run_script(SCRIPTS / "cert-deploy-hook", env=service_env(GATEWAY_PID_FILE=pid_file))

    async def both_reloaded() -> bool:
        return counts(await tls_metrics(gateway)) == (2, 0)  # summed over the workers

    await wait_until(both_reloaded, within=10)
    serials = {(await handshake(gateway.https_port, verifying))[0] for _ in range(20)}
    assert serials == {second.serial}


@pytest.mark.parametrize(
    ("case", "named", "problem"),
    [
        ("expired", "GATEWAY_TLS_CERT_FILE", "the certificate expired on"),
        ("mismatched", "GATEWAY_TLS_KEY_FILE", "does not match the certificate"),
        ("missing", "GATEWAY_TLS_CERT_FILE", "cannot read it"),
    ],
)
async def test_boot_exits_69_naming_the_file(
    case: str,
    named: str,
    problem: str,
    ca: Issued,
    files: Files,
    start_gateway: StartGateway,
    upstream: FakeUpstream,
) -> None:
    good = make_leaf(ca)
    if case == "expired":
        write_pair(make_leaf(ca, expired=True), files.cert, files.key)
    elif case == "mismatched":
        write_pair(good, files.cert, files.key)
        files.key.write_bytes(make_leaf(ca).key_pem)
    else:
        files.key.write_bytes(good.key_pem)
    gateway = await start_gateway(
        upstream.url, wait=False, GATEWAY_TLS_CERT_FILE=files.cert, GATEWAY_TLS_KEY_FILE=files.key
    )
    assert await asyncio.wait_for(gateway.proc.wait(), 30) == 69
    await gateway.reader
    path = files.cert if named == "GATEWAY_TLS_CERT_FILE" else files.key
    assert any(f"{named} {path}: {problem}" in line for line in gateway.output), gateway.log()


async def test_boot_warns_of_a_certificate_expiring_within_14_days(
    ca: Issued, files: Files, start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    write_pair(make_leaf(ca, days=5), files.cert, files.key, ca)
    gateway = await start_gateway(
        upstream.url, GATEWAY_TLS_CERT_FILE=files.cert, GATEWAY_TLS_KEY_FILE=files.key
    )
    assert any(
        "WARNING" in line and "TLS CERTIFICATE EXPIRES IN 5.0 DAYS" in line
        for line in gateway.output
    ), gateway.log()


# --- the HTTP port with TLS on ----------------------------------------------------------------


async def raw_request(port: int, target: str, host: str = "chat.example.com") -> tuple[int, str]:
    """Sends the request target exactly as given (no client-side normalization)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        response = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body.decode(errors="replace")


async def test_http_port_serves_challenges_and_redirects_the_rest(
    ca: Issued, files: Files, tmp_path: Path, start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    write_pair(make_leaf(ca), files.cert, files.key, ca)
    webroot = tmp_path / "webroot"
    challenges = webroot / ".well-known" / "acme-challenge"
    challenges.mkdir(parents=True)
    (challenges / "Tok_en-1").write_text("Tok_en-1.thumbprint")
    (webroot / "secret").write_text("not for the internet")
    (tmp_path / "secret").write_text("not for the internet")
    gateway = await start_gateway(
        upstream.url,
        GATEWAY_TLS_CERT_FILE=files.cert,
        GATEWAY_TLS_KEY_FILE=files.key,
        GATEWAY_ACME_WEBROOT=webroot,
    )
    async with aiohttp.ClientSession() as session:
        for address in ("127.0.0.1", "[::1]"):  # pebble and Let's Encrypt try IPv6 first
            url = f"http://{address}:{gateway.http_port}/.well-known/acme-challenge/Tok_en-1"
            async with session.get(url) as resp:
                assert (resp.status, await resp.text()) == (200, "Tok_en-1.thumbprint")
        for method in ("GET", "POST", "DELETE"):
            async with session.request(
                method,
                URL(f"{gateway.http}/v1/chat?x=1&y=%2F", encoded=True),
                headers={"Host": "Chat.Example.com:8080"},
                allow_redirects=False,
            ) as resp:
                assert resp.status == 308
                assert resp.headers["Location"] == (
                    f"https://chat.example.com:{gateway.https_port}/v1/chat?x=1&y=%2F"
                )
        async with session.post(
            f"{gateway.http}/.well-known/acme-challenge/Tok_en-1", allow_redirects=False
        ) as resp:
            assert resp.status == 405
    for target in (
        "/.well-known/acme-challenge/missing",
        "/.well-known/acme-challenge/",
        "/.well-known/acme-challenge",
        "/.well-known/acme-challenge/../secret",
        "/.well-known/acme-challenge/../../secret",
        "/.well-known/acme-challenge/..%2F..%2Fsecret",
        "/.well-known/acme-challenge/%2e%2e/%2e%2e/secret",
        "/.well-known/acme-challenge/Tok_en-1/",
        "/.well-known/acme-challenge/Tok_en-1%00",
        "/.well-known/acme-challenge/.hidden",
    ):
        status, body = await raw_request(gateway.http_port, target)
        assert status == 404, target
        assert "not for the internet" not in body
    status, _ = await raw_request(gateway.http_port, "/", host="bad host")
    assert status == 400


async def test_https_redirect_false_serves_the_api_on_both_ports(
    ca: Issued, files: Files, tmp_path: Path, start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    """`make run`'s setting: HTTPS on, and plain HTTP still proxied (no redirect, no HSTS)."""
    write_pair(make_leaf(ca), files.cert, files.key, ca)
    gateway = await start_gateway(
        upstream.url,
        GATEWAY_TLS_CERT_FILE=files.cert,
        GATEWAY_TLS_KEY_FILE=files.key,
        GATEWAY_HTTPS_REDIRECT="false",
    )
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{gateway.http}/echo/x", allow_redirects=False) as resp:
            assert resp.status == 200
            assert "Strict-Transport-Security" not in resp.headers
        async with session.get(f"{gateway.https}/echo/x", ssl=False) as resp:
            assert resp.status == 200
            assert resp.headers["Strict-Transport-Security"] == "max-age=63072000"


async def test_a_handshake_that_never_comes_is_closed(
    ca: Issued, files: Files, start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    """The HTTPS port's handshake deadline: a connection that sends no ClientHello (or half
    of one) is closed, and a real client right after is served."""
    write_pair(make_leaf(ca), files.cert, files.key, ca)
    gateway = await start_gateway(
        upstream.url,
        GATEWAY_TLS_CERT_FILE=files.cert,
        GATEWAY_TLS_KEY_FILE=files.key,
        GATEWAY_TLS_HANDSHAKE_TIMEOUT="0.5",
    )
    for opening in (b"", b"\x16\x03\x01\x02\x00\x01"):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.https_port)
        writer.write(opening)
        started = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        assert asyncio.get_running_loop().time() - started >= 0.4
        writer.close()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{gateway.https}/healthz", ssl=False) as resp:
            assert resp.status == 200


async def test_without_tls_the_http_port_proxies_and_serves_challenges(
    tmp_path: Path, start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    """Getting the first certificate: no TLS yet, challenges served, everything else proxied."""
    challenges = tmp_path / ".well-known" / "acme-challenge"
    challenges.mkdir(parents=True)
    (challenges / "abc").write_text("abc.key")
    gateway = await start_gateway(upstream.url, GATEWAY_ACME_WEBROOT=tmp_path)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{gateway.http}/.well-known/acme-challenge/abc") as resp:
            assert (resp.status, await resp.text()) == (200, "abc.key")
        async with session.get(f"{gateway.http}/echo/x", allow_redirects=False) as resp:
            assert resp.status == 200
            assert "Strict-Transport-Security" not in resp.headers
    status, _ = await raw_request(gateway.http_port, "/.well-known/acme-challenge/..%2Fabc")
    assert status == 404


# --- scripts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["cert-issue", "cert-renew", "cert-deploy-hook"])
def test_scripts_explain_themselves(script: str) -> None:
    result = subprocess.run(
        [SCRIPTS / script, "--help"], capture_output=True, text=True, timeout=10
    )
    assert result.returncode == 0
    assert result.stdout.startswith(f"Usage: scripts/{script}")


def test_deploy_hook_installs_one_combined_pem_atomically(ca: Issued, tmp_path: Path) -> None:
    lineage = tmp_path / "live" / "chat.example.com"
    lineage.mkdir(parents=True)
    leaf = make_leaf(ca)
    (lineage / "fullchain.pem").write_bytes(leaf.cert_pem + ca.cert_pem)
    (lineage / "privkey.pem").write_bytes(leaf.key_pem)
    install = tmp_path / "tls"
    install.mkdir()
    env = service_env(
        RENEWED_LINEAGE=lineage,
        PIXELCRAFT_TLS_INSTALL_DIR=install,
        GATEWAY_PID_FILE=tmp_path / "absent.pid",
        **HOOK_ISOLATION,
    )
    for _ in range(2):  # safe to run twice
        result = subprocess.run(
            [SCRIPTS / "cert-deploy-hook"], env=env, capture_output=True, text=True, timeout=10
        )
        assert result.returncode == 0, result.stderr
        assert "no running gateway found" in result.stderr
    combined = install / "chat.example.com.pem"
    assert stat.S_IMODE(combined.stat().st_mode) == 0o640
    assert [p.name for p in install.iterdir()] == [combined.name]  # no temporary left behind
    _, info = load_pair(combined, combined)  # one file serves as both
    assert info.serial == leaf.serial


def test_cipher_list_is_mozilla_intermediate() -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_ciphers(CIPHERS)
    tls12 = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 == set(CIPHERS.split(":"))


def test_https_needs_its_own_port(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as info:
        GatewaySettings(
            _env_file=None,
            redis_url="redis://127.0.0.1:6379/0",
            gateway_upstream_url="http://127.0.0.1:8000",
            gateway_http_port=8443,
            gateway_tls_cert_file=tmp_path / "fullchain.pem",
            gateway_tls_key_file=tmp_path / "privkey.pem",
        )
    assert error_lines(info.value) == [
        "GATEWAY_TLS_CERT_FILE: needs GATEWAY_HTTPS_PORT to differ from GATEWAY_HTTP_PORT"
    ]


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("0.0.0.0", [("0.0.0.0", True), ("::", False)]),
        ("::", [("::", True), ("0.0.0.0", False)]),
        ("127.0.0.1", [("127.0.0.1", True), ("::1", False)]),
        ("::1", [("::1", True), ("127.0.0.1", False)]),
        ("10.0.0.7", [("10.0.0.7", True)]),
        ("localhost", [("localhost", True)]),
    ],
)
def test_wildcard_and_loopback_hosts_listen_on_both_families(
    host: str, expected: list[tuple[str, bool]]
) -> None:
    assert listen_addresses(host) == expected


@pytest.mark.parametrize(
    ("host", "port", "location"),
    [
        ("chat.example.com", 443, "https://chat.example.com/a%20b?q=%2F"),
        ("Chat.Example.com:80", 8443, "https://chat.example.com:8443/a%20b?q=%2F"),
        ("[2001:db8::1]:80", 443, "https://[2001:db8::1]/a%20b?q=%2F"),
        ("evil.example/x", 443, None),
        ("a@b", 443, None),
        ("", 443, None),
    ],
)
def test_redirect_location(host: str, port: int, location: str | None) -> None:
    assert https_location(host or None, "/a%20b?q=%2F", port) == location
