"""Test helpers for TLS: throwaway certificates, a local ACME CA (pebble), TLS client probes.

Pebble is Let's Encrypt's test ACME server. It always runs here with `-dnsserver` pointing at a
local pebble-challtestsrv that answers every name with 127.0.0.1 / ::1, so no lookup ever leaves
the machine; validation is real (PEBBLE_VA_ALWAYS_VALID=0) and over ::1 first, like the real
thing over IPv6. Every process started here is stopped by `stop()`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import subprocess
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devtools.services import free_port
from tests.conftest import sync_wait

ROOT = Path(__file__).resolve().parents[2]
APT_HINT = "apt-get install -y {pkg} (CI installs it through .ci/run)"


def require_tool(name: str, package: str | None = None) -> str:
    """The tool's path, or skip with how to install it (a failure under CI=true)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        pytest.skip(f"{name} is not installed: {APT_HINT.format(pkg=package or name)}")
    return found


# --- certificates -------------------------------------------------------------------------


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def serial(self) -> int:
        return self.cert.serial_number


def make_ca(name: str = "PixelCraft test CA") -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def make_leaf(
    ca: Issued,
    names: tuple[str, ...] = ("localhost",),
    ips: tuple[str, ...] = ("127.0.0.1", "::1"),
    *,
    days: float = 90,
    expired: bool = False,
) -> Issued:
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    start, end = (
        (now - timedelta(days=10), now - timedelta(days=1))
        if expired
        else (
            now - timedelta(minutes=5),
            now + timedelta(days=days),
        )
    )
    alt: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(cert, key)


def write_pair(issued: Issued, cert_file: Path, key_file: Path, ca: Issued | None = None) -> None:
    """Replace both files atomically (each by a rename), the chain after the leaf."""
    for path, data in (
        (cert_file, issued.cert_pem + (ca.cert_pem if ca else b"")),
        (key_file, issued.key_pem),
    ):
        temporary = path.with_name(path.name + ".new")
        temporary.write_bytes(data)
        temporary.replace(path)


def serial_of_pem(path: Path) -> int:
    return x509.load_pem_x509_certificates(path.read_bytes())[0].serial_number


# --- TLS client probes ----------------------------------------------------------------------


def client_context(cafile: Path | None = None) -> ssl.SSLContext:
    """Verifies the chain against `cafile` (not the name: tests connect to 127.0.0.1)."""
    if cafile is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=str(cafile))
        context.check_hostname = False
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


async def handshake(
    port: int,
    context: ssl.SSLContext | None = None,
    server_name: str | None = "localhost",
    host: str = "127.0.0.1",
) -> tuple[int, str | None, str | None]:
    """A fresh TLS connection: (certificate serial, TLS version, ALPN protocol)."""
    context = context if context is not None else client_context()
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=context, server_hostname=server_name), 10
    )
    try:
        tls: ssl.SSLObject = writer.get_extra_info("ssl_object")
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return (
            x509.load_der_x509_certificate(der).serial_number,
            tls.version(),
            tls.selected_alpn_protocol(),
        )
    finally:
        writer.close()
        await writer.wait_closed()


# --- pebble ---------------------------------------------------------------------------------


def _dns_answers(port: int) -> bool:
    """Whether pebble-challtestsrv's DNS answers an A query on 127.0.0.1:port."""
    query = (
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
        + b"".join(bytes([len(p)]) + p for p in (b"probe", b"test"))
        + b"\x00\x00\x01\x00\x01"
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        try:
            sock.sendto(query, ("127.0.0.1", port))
            reply = sock.recv(512)
        except OSError:
            return False
    return reply[:2] == b"\x12\x34"


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class Pebble:
    """A running pebble + pebble-challtestsrv pair; `http_port` is where it validates http-01."""

    workdir: Path
    http_port: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    port: int = 0
    management_port: int = 0

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    @property
    def ca_bundle(self) -> Path:
        """The CA of pebble's own HTTPS listener (for certbot: REQUESTS_CA_BUNDLE)."""
        return self.workdir / "listener-ca.pem"

    @property
    def root_file(self) -> Path:
        return self.workdir / "issuing-root.pem"

    def start(self) -> None:
        pebble = require_tool("pebble")
        challtestsrv = require_tool("pebble-challtestsrv", "pebble")
        self.workdir.mkdir(parents=True, exist_ok=True)
        ca = make_ca("pebble listener CA")
        listener = make_leaf(ca, ("localhost",), ("127.0.0.1", "::1"))
        self.ca_bundle.write_bytes(ca.cert_pem)
        (self.workdir / "listener.pem").write_bytes(listener.cert_pem)
        (self.workdir / "listener.key").write_bytes(listener.key_pem)
        dns_port, dns_management = free_port(), free_port()
        self.port, self.management_port = free_port(), free_port()
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.port}",
                "managementListenAddress": f"127.0.0.1:{self.management_port}",
                "certificate": str(self.workdir / "listener.pem"),
                "privateKey": str(self.workdir / "listener.key"),
                "httpPort": self.http_port,
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
                "certificateValidityPeriod": 7776000,  # 90 days, like Let's Encrypt
            }
        }
        (self.workdir / "pebble.json").write_text(json.dumps(config))
        self._spawn(
            "challtestsrv",
            [
                challtestsrv,
                "-dns01",
                f"127.0.0.1:{dns_port}",
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                f"127.0.0.1:{dns_management}",
            ],
            {},
        )
        sync_wait(lambda: self._alive() and _dns_answers(dns_port), 20, "challtestsrv DNS")
        self._spawn(
            "pebble",
            [
                pebble,
                "-config",
                str(self.workdir / "pebble.json"),
                "-dnsserver",
                f"127.0.0.1:{dns_port}",
            ],
            {
                "PEBBLE_VA_NOSLEEP": "1",
                "PEBBLE_VA_ALWAYS_VALID": "0",
                "PEBBLE_WFE_NONCEREJECT": "0",
                "PEBBLE_AUTHZREUSE": "0",
            },
        )
        sync_wait(
            lambda: self._alive() and _tcp_open(self.port) and _tcp_open(self.management_port),
            20,
            "pebble listening",
        )
        self.root_file.write_bytes(self._get(f"https://127.0.0.1:{self.management_port}/roots/0"))

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        self.procs.append(
            subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env={**os.environ, **env},
                start_new_session=True,
            )
        )
        log.close()

    def _alive(self) -> bool:
        for proc in self.procs:
            if proc.poll() is not None:
                raise AssertionError(f"{proc.args!r} exited {proc.returncode}:\n{self.logs()}")
        return True

    def _get(self, url: str) -> bytes:
        context = ssl.create_default_context(cafile=str(self.ca_bundle))
        with urllib.request.urlopen(url, context=context, timeout=10) as resp:  # noqa: S310
            body: bytes = resp.read()
            return body

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.workdir.glob("*.log"))
        )

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # certbot, one config/work/logs directory per pebble run (pebble forgets accounts)
    @property
    def certbot_dir(self) -> Path:
        return self.workdir / "letsencrypt"

    def certbot_options(self) -> list[str]:
        return [
            "--config-dir",
            str(self.certbot_dir / "config"),
            "--work-dir",
            str(self.certbot_dir / "work"),
            "--logs-dir",
            str(self.certbot_dir / "logs"),
        ]

    def certbot_env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "REQUESTS_CA_BUNDLE": str(self.ca_bundle), **extra}

    def live(self, domain: str) -> Path:
        return self.certbot_dir / "config" / "live" / domain
