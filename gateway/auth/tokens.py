"""Verification of `Authorization: Bearer` JWTs (RFC 6750, RFC 7519) against a secret or a JWKS.

Keys come from a legacy HS256 shared secret and/or an RFC 7517 JSON Web Key Set, fetched from a URL
(refreshed lazily, re-fetched on an unknown `kid` at most once per `min_refetch_interval`, one fetch
shared by every waiting request) or read once from a file. Each key is bound to the algorithms its
type allows (RFC 8725 §3.1), so neither `none` nor an HS256 token verified with a public key as the
HMAC secret can get through. A cached key costs no I/O.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiohttp
import jwt
from jwt.exceptions import InvalidSubjectError
from jwt.types import Options

from pixelcraft.boot import DependencyUnavailable
from pixelcraft.contract import ANONYMOUS_PREFIX, USER_ID, reserved

logger = logging.getLogger(__name__)

FETCH_TIMEOUT = 5.0
MAX_JWKS_BYTES = 1_048_576
MAX_TOKEN_LENGTH = 8192

# RFC 6750 §2.1: credentials = "Bearer" 1*SP b64token; the scheme is case-insensitive (RFC 9110).
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*)")
# The gateway forwards `sub` as X-User-Id, so it must fit that header's pattern (and stay out of
# the anonymous namespace, pixelcraft.contract).
_SUBJECT = USER_ID

HMAC_ALGORITHM = "HS256"
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
# RFC 7518 §3.4: each curve goes with exactly one ECDSA algorithm.
EC_ALGORITHMS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
OKP_CURVES = ("Ed25519", "Ed448")
ASYMMETRIC_ALGORITHMS = frozenset((*RSA_ALGORITHMS, *EC_ALGORITHMS.values(), "EdDSA"))

# Most specific first: InvalidSignatureError is a DecodeError, every other one an InvalidTokenError.
_REASONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.InvalidSignatureError, "token signature is invalid"),
    (jwt.ExpiredSignatureError, "token has expired"),
    (jwt.InvalidAudienceError, "token audience is not accepted"),
    (jwt.InvalidIssuerError, "token issuer is not accepted"),
    (jwt.InvalidIssuedAtError, "token iat claim is not a number"),
    (InvalidSubjectError, "token sub claim is not a valid user id"),
    (jwt.InvalidAlgorithmError, "token algorithm is not allowed"),
    (jwt.DecodeError, "token is malformed"),
    (jwt.InvalidTokenError, "token is invalid"),
)


class InvalidToken(Exception):
    """A Bearer token was malformed or failed verification; `reason` is safe to show the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class JWKSUnavailable(DependencyUnavailable):
    """The JSON Web Key Set could not be loaded."""


@dataclass(frozen=True, slots=True)
class Claims:
    """A verified token: its subject and every claim."""

    sub: str
    claims: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class _Key:
    key: Any
    algorithms: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _KeySet:
    by_kid: Mapping[str, _Key] = field(default_factory=dict)
    only: _Key | None = None

    def find(self, kid: str | None) -> _Key | None:
        return self.only if kid is None else self.by_kid.get(kid)


def bearer_token(header: str | None) -> str | None:
    """The token of an Authorization header value; None when there is no header."""
    if header is None:
        return None
    match = _BEARER.fullmatch(header.strip())
    if match is None:
        raise InvalidToken("malformed Authorization header")
    return match.group(1)


def _algorithms_for(jwk: Mapping[str, Any]) -> tuple[str, ...]:
    """The signature algorithms a JWK may verify; () for keys not meant for that (RFC 7517 §4)."""
    ops = jwk.get("key_ops")
    if jwk.get("use", "sig") != "sig" or "d" in jwk:
        return ()  # an encryption key, or a private key that should never have been published
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return ()
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if not isinstance(crv, str | None):
        return ()
    allowed: tuple[str, ...] = ()
    if kty == "RSA":
        allowed = RSA_ALGORITHMS
    elif kty == "EC" and crv in EC_ALGORITHMS:
        allowed = (EC_ALGORITHMS[crv],)
    elif kty == "OKP" and crv in OKP_CURVES:
        allowed = ("EdDSA",)
    alg = jwk.get("alg")
    if alg is None:
        return allowed
    return (alg,) if alg in allowed else ()


def parse_jwks(data: object) -> _KeySet:
    """The usable signature keys of a JWK Set document; ValueError when it has none."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("not a JWK Set (no keys array)")
    by_kid: dict[str, _Key] = {}
    usable: list[_Key] = []
    for jwk in data["keys"]:
        algorithms = _algorithms_for(jwk) if isinstance(jwk, dict) else ()
        if not algorithms:
            continue
        try:
            built = jwt.PyJWK(jwk, algorithm=algorithms[0])
        except jwt.PyJWTError as exc:
            logger.warning("JWKS key %r skipped: %s", jwk.get("kid"), exc)
            continue
        short = built.Algorithm.check_key_length(built.key)
        if short:
            logger.warning("JWKS key %r skipped: %s", jwk.get("kid"), short)
            continue
        key = _Key(built.key, algorithms)
        usable.append(key)
        if isinstance(built.key_id, str):
            by_kid[built.key_id] = key
    if not usable:
        raise ValueError("no usable signature keys")
    return _KeySet(MappingProxyType(by_kid), usable[0] if len(usable) == 1 else None)


class TokenVerifier:
    """Verifies Bearer JWTs; `start()` loads the key set, `close()` ends any fetch in flight."""

    def __init__(
        self,
        *,
        secret: str | None = None,
        jwks_url: str | None = None,
        jwks_file: Path | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        session: aiohttp.ClientSession | None = None,
        leeway: float = 10.0,
        refresh_interval: float = 600.0,
        min_refetch_interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if secret is None and jwks_url is None and jwks_file is None:
            raise ValueError("give a secret, a JWKS URL or a JWKS file")
        if jwks_url is not None and jwks_file is not None:
            raise ValueError("give a JWKS URL or a JWKS file, not both")
        # RFC 7518 §3.2: an HS256 key is at least as long as the hash output.
        if secret is not None and len(secret.encode()) < 32:
            raise ValueError("the JWT secret must be at least 32 bytes long")
        self._secret = secret.encode() if secret is not None else None
        self._jwks_url = jwks_url
        self._jwks_file = jwks_file
        self._audience = audience
        self._issuer = issuer
        self._session = session
        self._owns_session = False
        self._leeway = leeway
        self._refresh_interval = refresh_interval
        self._min_refetch_interval = min_refetch_interval
        self._clock = clock
        self._keys = _KeySet()
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._fetch: asyncio.Task[None] | None = None
        self._closed = False
        # Audience is checked only when configured: Supabase tokens always carry `aud`.
        self._options: Options = {
            "require": ["exp"],
            "verify_aud": audience is not None,
            "enforce_minimum_key_length": True,
        }

    async def start(self) -> None:
        """Load the key set: a bad file raises JWKSUnavailable, an unreachable URL only warns."""
        if self._jwks_file is not None:
            try:
                data = json.loads(await asyncio.to_thread(self._jwks_file.read_bytes))
                self._keys = parse_jwks(data)
            except (OSError, ValueError, RecursionError) as exc:
                raise JWKSUnavailable(f"cannot load JWKS file {self._jwks_file}: {exc}") from exc
        if self._jwks_url is not None:
            if self._session is None:
                self._session = aiohttp.ClientSession()
                self._owns_session = True
            await self._refetch()
            if self._fetched_at is None:
                logger.warning("starting without JWKS keys; will retry %s", self._jwks_url)

    async def close(self) -> None:
        self._closed = True
        if self._fetch is not None:
            self._fetch.cancel()
            await asyncio.wait({self._fetch})
        if self._owns_session and self._session is not None:
            await self._session.close()

    async def verify(self, token: str) -> Claims:
        """The verified claims of a compact JWS token, or InvalidToken with a safe reason."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken("token is too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("token is malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise InvalidToken("token algorithm is not allowed")
        key: Any
        algorithms: tuple[str, ...]
        if alg == HMAC_ALGORITHM and self._secret is not None:
            key, algorithms = self._secret, (HMAC_ALGORITHM,)
        elif alg in ASYMMETRIC_ALGORITHMS and (self._jwks_url or self._jwks_file):
            found = await self._key_for(header.get("kid"))
            if alg not in found.algorithms:
                raise InvalidToken("token algorithm does not match its signing key")
            key, algorithms = found.key, found.algorithms
        else:
            raise InvalidToken("token algorithm is not allowed")
        payload = self._decode(token, key, algorithms)
        sub = payload.get("sub")
        if sub is None:
            raise InvalidToken("token has no sub claim")
        if not isinstance(sub, str) or _SUBJECT.fullmatch(sub) is None:
            raise InvalidToken("token sub claim is not a valid user id")
        if reserved(sub):
            raise InvalidToken(
                f'token sub claim is in the anonymous "{ANONYMOUS_PREFIX}" namespace'
            )
        return Claims(sub, MappingProxyType(payload))

    def _decode(self, token: str, key: Any, algorithms: tuple[str, ...]) -> dict[str, Any]:
        try:
            return jwt.decode(
                token,
                key,
                algorithms=algorithms,
                options=self._options,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
            )
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"token has no {exc.claim} claim") from None
        except jwt.ImmatureSignatureError as exc:
            # PyJWT raises the same type for both; its message names the claim.
            future = "(iat)" in str(exc)
            raise InvalidToken(
                "token is issued in the future" if future else "token is not yet valid"
            ) from None
        except jwt.PyJWTError as exc:
            reason = next((text for kind, text in _REASONS if isinstance(exc, kind)), None)
            raise InvalidToken(reason or "token could not be verified") from None

    async def _key_for(self, kid: str | None) -> _Key:
        if self._jwks_url is not None and (
            self._fetched_at is None or self._clock() - self._fetched_at >= self._refresh_interval
        ):
            self._start_fetch()  # in the background: the cached keys serve meanwhile
        found = self._keys.find(kid)
        if found is None and self._jwks_url is not None:
            await self._refetch()
            found = self._keys.find(kid)
        if found is None:
            raise InvalidToken(
                "token has no kid" if kid is None else "token signing key is unknown"
            )
        return found

    async def _refetch(self) -> None:
        """Wait for a fetch of the key set: the one in flight, else a new one if not too soon."""
        task = self._start_fetch()
        if task is not None:
            # wait() neither raises the task's error nor cancels it when this caller is cancelled.
            await asyncio.wait({task})

    def _start_fetch(self) -> asyncio.Task[None] | None:
        if self._fetch is None and not self._closed:
            now = self._clock()
            if (
                self._attempted_at is not None
                and now - self._attempted_at < self._min_refetch_interval
            ):
                return None
            self._attempted_at = now
            self._fetch = asyncio.create_task(self._fetch_jwks())
            self._fetch.add_done_callback(self._fetch_done)
        return self._fetch

    def _fetch_done(self, task: asyncio.Task[None]) -> None:
        if self._fetch is task:
            self._fetch = None
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("JWKS fetch from %s failed unexpectedly", self._jwks_url, exc_info=exc)

    async def _fetch_jwks(self) -> None:
        assert self._session is not None and self._jwks_url is not None
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
        try:
            async with self._session.get(self._jwks_url, timeout=timeout) as response:
                response.raise_for_status()
                body = bytearray()
                async for chunk in response.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
            keys = parse_jwks(json.loads(body))
        except (aiohttp.ClientError, TimeoutError, ValueError, RecursionError) as exc:
            logger.warning("JWKS fetch from %s failed: %s", self._jwks_url, str(exc) or repr(exc))
            return
        self._keys = keys
        self._fetched_at = self._clock()
        logger.info("JWKS loaded from %s: %d key ids", self._jwks_url, len(keys.by_kid))
