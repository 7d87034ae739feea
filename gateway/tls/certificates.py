"""The HTTPS listener's certificate: Mozilla-intermediate contexts, the boot check, hot reload.

Reloading never touches a context that is serving: calling load_cert_chain() again on a live
SSLContext with a torn or mismatched pair raises yet leaves the context without a usable key, and
every later handshake fails. Instead each reload builds a fresh context and loads the new pair
into it (which is the validation); only then does `current` point at it. The listening context's
SNI callback runs for every ClientHello, with or without SNI, and moves the handshake onto
`current`: new connections get the new certificate, open ones keep theirs. A failed reload keeps
the current certificate, logs and counts. Reloads come from SIGHUP (certbot's deploy hook, through
Lifecycle) and from a slow poll of the files' identity, the safety net: certbot switches the
`live/` links one at a time, so the poll reloads only once the files have stayed unchanged for a
whole interval, and never trusts a half-switched pair anyway.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)

from gateway.keys import lifecycle_key
from gateway.metrics import Metrics
from gateway.serving.lifecycle import ReloadFailed
from pixelcraft.aio import cancel

logger = logging.getLogger(__name__)

# https://ssl-config.mozilla.org/guidelines/5.7.json, "intermediate": TLS 1.2 and 1.3; these
# TLS 1.2 suites (OpenSSL's default TLS 1.3 suites are the profile's); the client's preference
# (ChaCha20 for phones without AES instructions); no renegotiation, no session tickets (their
# key would never rotate). Groups: gateway/tls/openssl.cnf. (HSTS, two years: gateway.edge.wire.)
CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
EXPIRY_WARNING = timedelta(days=14)
OPENSSL_CNF = Path(__file__).with_name("openssl.cnf")  # set by gateway.tls.openssl

CERT_VARIABLE = "GATEWAY_TLS_CERT_FILE"
KEY_VARIABLE = "GATEWAY_TLS_KEY_FILE"

FileIdentity = tuple[int, int, int] | None  # (st_ino, st_mtime_ns, st_size); None: unreadable


class TLSFileError(Exception):
    """A certificate or key file that cannot be served; the message names the file."""

    def __init__(self, variable: str, path: Path, problem: str) -> None:
        super().__init__(f"{variable} {path}: {problem}")


@dataclass(frozen=True)
class CertificateInfo:
    """What the logs and metrics say about the certificate being served."""

    serial: int
    subject: str
    names: tuple[str, ...]
    not_after: datetime

    def describe(self) -> str:
        names = ", ".join(self.names) or self.subject
        return f"{names} (serial {self.serial:x}, expires {self.not_after:%Y-%m-%d %H:%M} UTC)"


def server_context() -> ssl.SSLContext:
    """A server context with the Mozilla intermediate settings and no certificate yet."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS)
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
    context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(["http/1.1"])
    return context


def _read(variable: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TLSFileError(variable, path, f"cannot read it: {exc.strerror or exc}") from exc


def _no_password() -> bytes:
    raise ValueError("the private key is encrypted; the gateway needs it unencrypted")


def _public_key_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def load_pair(
    cert_file: Path, key_file: Path, now: datetime | None = None
) -> tuple[ssl.SSLContext, CertificateInfo]:
    """A fresh server context serving the pair, with facts about its certificate.

    TLSFileError, naming the file at fault, when a file is missing, unreadable, empty or torn,
    the key does not match the certificate, or the certificate has expired.
    """
    cert_pem = _read(CERT_VARIABLE, cert_file)
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise TLSFileError(
            CERT_VARIABLE, cert_file, "holds no complete PEM certificate chain (empty or torn?)"
        ) from exc
    leaf = chain[0]
    key_pem = _read(KEY_VARIABLE, key_file)
    try:
        key = load_pem_private_key(key_pem, password=None)
    except TypeError as exc:
        raise TLSFileError(KEY_VARIABLE, key_file, "the private key is encrypted") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TLSFileError(
            KEY_VARIABLE, key_file, "holds no complete PEM private key (empty or torn?)"
        ) from exc
    if _public_key_der(key.public_key()) != _public_key_der(leaf.public_key()):
        raise TLSFileError(KEY_VARIABLE, key_file, f"does not match the certificate in {cert_file}")
    now = now if now is not None else datetime.now(UTC)
    if leaf.not_valid_after_utc <= now:
        raise TLSFileError(
            CERT_VARIABLE,
            cert_file,
            f"the certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
        )
    context = server_context()
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_password)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TLSFileError(CERT_VARIABLE, cert_file, f"OpenSSL refused the pair: {exc}") from exc
    if _read(CERT_VARIABLE, cert_file) != cert_pem:
        raise TLSFileError(CERT_VARIABLE, cert_file, "changed while being loaded; try again")
    return context, _info(leaf)


def _info(cert: x509.Certificate) -> CertificateInfo:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    return CertificateInfo(
        serial=cert.serial_number,
        subject=cert.subject.rfc4514_string(),
        names=names,
        not_after=cert.not_valid_after_utc,
    )


def file_identity(*paths: Path) -> tuple[FileIdentity, ...]:
    """What the poll compares: each file's inode, mtime and size (links followed)."""
    identities: list[FileIdentity] = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            identities.append(None)
        else:
            identities.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(identities)


def warn_if_expiring(info: CertificateInfo, now: datetime | None = None) -> None:
    left = info.not_after - (now if now is not None else datetime.now(UTC))
    if left < EXPIRY_WARNING:
        logger.warning(
            "TLS CERTIFICATE EXPIRES IN %.1f DAYS: %s; renew it (scripts/cert-renew)",
            left.total_seconds() / 86400,
            info.describe(),
        )


def check_openssl_conf() -> None:
    """Say so when the key-exchange groups are not the gateway's (OPENSSL_CONF set elsewhere)."""
    given = os.environ.get("OPENSSL_CONF")
    if given != str(OPENSSL_CNF):
        logger.warning(
            "OPENSSL_CONF=%s: TLS key-exchange groups come from that file, not %s",
            given or "(unset)",
            OPENSSL_CNF,
        )


class ServingCertificate:
    """The certificate of the HTTPS listener: `listening` is handed to the listener once;
    `current` is what new handshakes get, switched by `reload()`."""

    def __init__(
        self, cert_file: Path, key_file: Path, metrics: Metrics, poll_seconds: float = 60.0
    ) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.metrics = metrics
        self.poll_seconds = poll_seconds
        self.listening: ssl.SSLContext | None = None
        self.current: ssl.SSLContext | None = None
        self.info: CertificateInfo | None = None
        self._identity: tuple[FileIdentity, ...] = ()

    def load(self) -> CertificateInfo:
        """The boot load: TLSFileError if the pair cannot be served."""
        identity = file_identity(self.cert_file, self.key_file)
        context, info = load_pair(self.cert_file, self.key_file)
        context.sni_callback = self._select
        self.listening = self.current = context
        self._identity = identity
        self._serve(info)
        self.metrics.tls_reloads.labels("ok")  # both series exist from the start, at 0
        self.metrics.tls_reloads.labels("error")
        return info

    def _select(self, connection: ssl.SSLObject, server_name: str | None, _: object) -> None:
        """Every ClientHello: the handshake continues on the latest good context."""
        current = self.current
        if current is not None and connection.context is not current:
            connection.context = current

    def reload(self) -> CertificateInfo:
        """Load the files into a fresh context and serve it; on TLSFileError keep the current
        one (and count the error)."""
        identity = file_identity(self.cert_file, self.key_file)
        self._identity = identity  # a bad pair is retried when it changes, not every poll
        try:
            context, info = load_pair(self.cert_file, self.key_file)
        except TLSFileError:
            self.metrics.tls_reloads.labels("error").inc()
            raise
        self.current = context
        self._serve(info)
        self.metrics.tls_reloads.labels("ok").inc()
        return info

    def _serve(self, info: CertificateInfo) -> None:
        self.info = info
        self.metrics.tls_expiry.set(info.not_after.timestamp())
        logger.info("TLS certificate: %s", info.describe())
        warn_if_expiring(info)

    async def reload_on_signal(self) -> None:
        """The Lifecycle reloader (SIGHUP)."""
        try:
            self.reload()
        except TLSFileError as exc:
            raise ReloadFailed(str(exc)) from exc

    async def poll(self) -> None:
        """Reload when the files changed and then stayed unchanged for one interval."""
        seen = self._identity
        while True:
            await asyncio.sleep(self.poll_seconds)
            identity = file_identity(self.cert_file, self.key_file)
            settled = identity == seen
            seen = identity
            if identity == self._identity or not settled:
                continue
            logger.info("TLS files changed on disk; reloading them")
            try:
                self.reload()
            except TLSFileError as exc:
                logger.error("TLS files not reloaded, keeping the current certificate: %s", exc)

    async def reloading_ctx(self, app: web.Application) -> AsyncIterator[None]:
        """Cleanup context: SIGHUP reloads the certificate; the poll runs while the app does."""
        app[lifecycle_key].reloaders.append(("TLS certificate", self.reload_on_signal))
        task = None
        if self.poll_seconds > 0:
            task = asyncio.get_running_loop().create_task(self.poll())
        yield
        await cancel(task)
