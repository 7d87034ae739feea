"""TokenVerifier against real keys and a real JWKS server on a local socket."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from gateway.auth.tokens import (
    Claims,
    InvalidToken,
    JWKSUnavailable,
    TokenVerifier,
    bearer_token,
)

SECRET = "a-legacy-supabase-jwt-secret-of-enough-bytes"
AUDIENCE = "authenticated"
ISSUER = "https://project.supabase.co/auth/v1"
USER = "5f0c6d2e-8a53-4c1b-9e4a-2b7d1c3f9a10"


@dataclass
class Keys:
    rsa1: rsa.RSAPrivateKey
    rsa2: rsa.RSAPrivateKey
    p256: ec.EllipticCurvePrivateKey
    ed: ed25519.Ed25519PrivateKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa1=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rsa2=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        p256=ec.generate_private_key(ec.SECP256R1()),
        ed=ed25519.Ed25519PrivateKey.generate(),
    )


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str | None, **extra: Any) -> dict[str, Any]:
    jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, **({"kid": kid} if kid else {}), **extra}


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str, **extra: Any) -> dict[str, Any]:
    return {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, **extra}


def ed_jwk(key: ed25519.Ed25519PrivateKey, kid: str) -> dict[str, Any]:
    return {**OKPAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid}


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": USER,
        "aud": AUDIENCE,
        "iss": ISSUER,
        "iat": now,
        "exp": now + 3600,
        "role": "authenticated",
    }
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not None}


def hs256(**overrides: Any) -> str:
    return jwt.encode(claims(**overrides), SECRET, algorithm="HS256")


def signed(key: Any, alg: str, kid: str | None, **overrides: Any) -> str:
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims(**overrides), key, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged_hs256(secret: bytes, kid: str | None) -> str:
    """An HS256 token MACed with `secret`, built by hand: PyJWT refuses PEM bytes as a secret."""
    header = {"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid else {})}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims()).encode())}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def assert_safe(reason: str, token: str) -> None:
    """A reason fit for WWW-Authenticate: no token material, no quotes or backslashes."""
    assert '"' not in reason and "\\" not in reason
    assert not token or token not in reason
    for part in token.split("."):
        if len(part) >= 8:
            assert part not in reason


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class JWKSServer:
    url: str
    keys: list[Any]
    fetches: int = 0
    down: bool = False
    hang: asyncio.Event | None = None
    requested: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def jwks(aiohttp_server: Any, keys: Keys) -> JWKSServer:
    state = JWKSServer(url="", keys=[rsa_jwk(keys.rsa1, "rsa-1"), ec_jwk(keys.p256, "ec-1")])

    async def serve(request: web.Request) -> web.Response:
        state.fetches += 1
        state.requested.set()
        if state.hang is not None:
            await state.hang.wait()
        if state.down:
            raise web.HTTPServiceUnavailable()
        return web.json_response({"keys": state.keys})

    app = web.Application()
    app.router.add_get("/auth/v1/.well-known/jwks.json", serve)
    server = await aiohttp_server(app)
    state.url = str(server.make_url("/auth/v1/.well-known/jwks.json"))
    return state


Factory = Callable[..., Awaitable[TokenVerifier]]


@pytest.fixture
async def make_verifier() -> AsyncIterator[Factory]:
    """Started verifiers on one shared session, all closed at the end."""
    made: list[TokenVerifier] = []
    async with aiohttp.ClientSession() as session:

        async def make(**kwargs: Any) -> TokenVerifier:
            if "jwks_url" in kwargs:
                kwargs.setdefault("session", session)
            verifier = TokenVerifier(**kwargs)
            made.append(verifier)
            await verifier.start()
            return verifier

        yield make
        for verifier in made:
            await verifier.close()


async def rejected(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(InvalidToken) as caught:
        await verifier.verify(token)
    assert_safe(caught.value.reason, token)
    return caught.value.reason


# --- bearer_token (RFC 6750 §2.1) ---


def test_bearer_token_absent() -> None:
    assert bearer_token(None) is None


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer   tok", "tok"),
        ("BEARER a-b_c~+/==", "a-b_c~+/=="),
    ],
)
def test_bearer_token_parsed(header: str, token: str) -> None:
    assert bearer_token(header) == token


@pytest.mark.parametrize(
    "header",
    [
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer ",
        "",
        "Bearer a b",
        "Bearer\tabc",
        'Bearer ab"c',
        "Token x",
    ],
)
def test_bearer_token_malformed(header: str) -> None:
    with pytest.raises(InvalidToken) as caught:
        bearer_token(header)
    assert caught.value.reason == "malformed Authorization header"


# --- HS256 with the legacy shared secret ---


async def test_hs256_valid(make_verifier: Factory) -> None:
    verifier = await make_verifier(secret=SECRET, audience=AUDIENCE, issuer=ISSUER)
    result = await verifier.verify(hs256())
    assert isinstance(result, Claims)
    assert result.sub == USER
    assert result.claims["role"] == "authenticated"
    with pytest.raises(TypeError):
        result.claims["sub"] = "someone-else"  # type: ignore[index]


async def test_hs256_without_audience_or_issuer_configured(make_verifier: Factory) -> None:
    verifier = await make_verifier(secret=SECRET)
    assert (await verifier.verify(hs256(aud="anything", iss="anyone"))).sub == USER


async def test_audience_list_and_leeway_accepted(make_verifier: Factory) -> None:
    verifier = await make_verifier(secret=SECRET, audience=AUDIENCE, issuer=ISSUER)
    now = int(time.time())
    token = hs256(aud=["other", AUDIENCE], iat=now + 5, nbf=now + 5, exp=now - 5)
    assert (await verifier.verify(token)).sub == USER


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"exp": -120}, "token has expired"),
        ({"exp": None}, "token has no exp claim"),
        ({"nbf": 120}, "token is not yet valid"),
        ({"iat": 120}, "token is issued in the future"),
        ({"iat": "yesterday"}, "token iat claim is not a number"),
        ({"aud": "anon"}, "token audience is not accepted"),
        ({"aud": None}, "token has no aud claim"),
        ({"iss": "https://evil.example/auth/v1"}, "token issuer is not accepted"),
        ({"iss": None}, "token has no iss claim"),
        ({"sub": None}, "token has no sub claim"),
        ({"sub": ""}, "token sub claim is not a valid user id"),
        ({"sub": 42}, "token sub claim is not a valid user id"),
        ({"sub": "x" * 129}, "token sub claim is not a valid user id"),
        ({"sub": "alice smith"}, "token sub claim is not a valid user id"),
        ({"sub": "alice\n"}, "token sub claim is not a valid user id"),
    ],
)
async def test_hs256_claim_rejections(
    make_verifier: Factory, overrides: dict[str, Any], reason: str
) -> None:
    verifier = await make_verifier(secret=SECRET, audience=AUDIENCE, issuer=ISSUER)
    now = int(time.time())
    for name in ("exp", "nbf", "iat"):
        if isinstance(overrides.get(name), int):
            overrides = {**overrides, name: now + overrides[name]}
    assert await rejected(verifier, hs256(**overrides)) == reason


async def test_longest_subject_accepted(make_verifier: Factory) -> None:
    verifier = await make_verifier(secret=SECRET)
    sub = "user:a.b_c@example-1" + "x" * 108
    assert (await verifier.verify(hs256(sub=sub))).sub == sub


async def test_hs256_bad_signature_and_malformed(make_verifier: Factory) -> None:
    verifier = await make_verifier(secret=SECRET)
    other = jwt.encode(claims(), "another-secret-that-is-long-enough-xx", algorithm="HS256")
    assert await rejected(verifier, other) == "token signature is invalid"
    head, body, _ = hs256().split(".")
    assert await rejected(verifier, f"{head}.{body}.{b64(b'x' * 32)}") == (
        "token signature is invalid"
    )
    for garbage in ("", "abc", "a.b.c", "eyJhbGciOiJIUzI1NiJ9.!!!.abc", hs256() + ".x"):
        assert await rejected(verifier, garbage) == "token is malformed"
    assert await rejected(verifier, "a" * 10_000) == "token is too long"


async def test_alg_none_and_other_hmac_rejected(make_verifier: Factory) -> None:
    verifier = await make_verifier(secret=SECRET)
    unsigned = jwt.encode(claims(), "", algorithm="none")
    assert await rejected(verifier, unsigned) == "token algorithm is not allowed"
    stripped = hs256().rsplit(".", 1)[0] + "."
    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    assert await rejected(verifier, header + stripped[stripped.index(".") :]) == (
        "token algorithm is not allowed"
    )
    hs512 = jwt.encode(claims(), SECRET * 2, algorithm="HS512")
    assert await rejected(verifier, hs512) == "token algorithm is not allowed"


async def test_asymmetric_token_rejected_without_jwks(make_verifier: Factory, keys: Keys) -> None:
    verifier = await make_verifier(secret=SECRET)
    token = signed(keys.rsa1, "RS256", "rsa-1")
    assert await rejected(verifier, token) == "token algorithm is not allowed"


def test_configuration_errors() -> None:
    with pytest.raises(ValueError, match="secret, a JWKS URL or a JWKS file"):
        TokenVerifier()
    with pytest.raises(ValueError, match="at least 32 bytes"):
        TokenVerifier(secret="short")
    with pytest.raises(ValueError, match="not both"):
        TokenVerifier(jwks_url="http://127.0.0.1:1/jwks", jwks_file=Path("jwks.json"))


# --- JWKS by URL and by file ---


async def test_rs256_es256_eddsa_via_url(
    make_verifier: Factory, jwks: JWKSServer, keys: Keys
) -> None:
    jwks.keys.append(ed_jwk(keys.ed, "ed-1"))
    verifier = await make_verifier(jwks_url=jwks.url, audience=AUDIENCE, issuer=ISSUER)
    assert (await verifier.verify(signed(keys.rsa1, "RS256", "rsa-1"))).sub == USER
    assert (await verifier.verify(signed(keys.rsa1, "PS256", "rsa-1"))).sub == USER
    assert (await verifier.verify(signed(keys.p256, "ES256", "ec-1"))).sub == USER
    assert (await verifier.verify(signed(keys.ed, "EdDSA", "ed-1"))).sub == USER
    assert jwks.fetches == 1
    forged = signed(keys.rsa2, "RS256", "rsa-1")
    assert await rejected(verifier, forged) == "token signature is invalid"
    expired = signed(keys.p256, "ES256", "ec-1", exp=int(time.time()) - 60)
    assert await rejected(verifier, expired) == "token has expired"
    wrong_aud = signed(keys.p256, "ES256", "ec-1", aud="anon")
    assert await rejected(verifier, wrong_aud) == "token audience is not accepted"


async def test_rs256_es256_via_file(make_verifier: Factory, keys: Keys, tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [rsa_jwk(keys.rsa1, "rsa-1"), ec_jwk(keys.p256, "ec-1")]}))
    verifier = await make_verifier(jwks_file=path, audience=AUDIENCE)
    assert (await verifier.verify(signed(keys.rsa1, "RS256", "rsa-1"))).sub == USER
    assert (await verifier.verify(signed(keys.p256, "ES256", "ec-1"))).sub == USER
    unknown = signed(keys.rsa2, "RS256", "rsa-2")
    assert await rejected(verifier, unknown) == "token signing key is unknown"


async def test_file_missing_or_invalid(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "jwks.json"
    with pytest.raises(JWKSUnavailable, match=str(missing)):
        await TokenVerifier(jwks_file=missing).start()
    for content in ("{not json", '{"keys": []}', '{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'):
        bad = tmp_path / "bad.json"
        bad.write_text(content)
        with pytest.raises(JWKSUnavailable, match=str(bad)):
            await TokenVerifier(jwks_file=bad).start()


async def test_secret_and_jwks_together(
    make_verifier: Factory, jwks: JWKSServer, keys: Keys
) -> None:
    verifier = await make_verifier(secret=SECRET, jwks_url=jwks.url)
    assert (await verifier.verify(hs256())).sub == USER
    assert (await verifier.verify(signed(keys.rsa1, "RS256", "rsa-1"))).sub == USER


# --- algorithm confusion (RFC 8725 §2.1, §3.1) ---


async def test_hs256_with_public_key_as_secret_rejected(
    make_verifier: Factory, jwks: JWKSServer, keys: Keys
) -> None:
    pem = keys.rsa1.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    forged = forged_hs256(pem, "rsa-1")
    jwks_only = await make_verifier(jwks_url=jwks.url)
    assert await rejected(jwks_only, forged) == "token algorithm is not allowed"
    both = await make_verifier(secret=SECRET, jwks_url=jwks.url)
    assert await rejected(both, forged) == "token signature is invalid"
    assert await rejected(both, forged_hs256(pem, None)) == "token signature is invalid"


async def test_algorithm_must_fit_the_key(
    make_verifier: Factory, jwks: JWKSServer, keys: Keys
) -> None:
    jwks.keys.append(rsa_jwk(keys.rsa2, "rsa-pinned", alg="RS256"))
    verifier = await make_verifier(jwks_url=jwks.url)
    # An EC key never verifies an RSA token, nor a P-256 key an ES384 one.
    on_ec = signed(keys.rsa1, "RS256", "ec-1")
    assert await rejected(verifier, on_ec) == "token algorithm does not match its signing key"
    p384 = signed(ec.generate_private_key(ec.SECP384R1()), "ES384", "ec-1")
    assert await rejected(verifier, p384) == "token algorithm does not match its signing key"
    # The JWK's own alg is honoured.
    pinned = signed(keys.rsa2, "RS512", "rsa-pinned")
    assert await rejected(verifier, pinned) == "token algorithm does not match its signing key"
    assert (await verifier.verify(signed(keys.rsa2, "RS256", "rsa-pinned"))).sub == USER
    unsigned = jwt.encode(claims(), "", algorithm="none", headers={"kid": "rsa-1"})
    assert await rejected(verifier, unsigned) == "token algorithm is not allowed"


async def test_unusable_jwks_entries_skipped(
    make_verifier: Factory, jwks: JWKSServer, keys: Keys
) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 (on purpose)
    jwks.keys = [
        rsa_jwk(keys.rsa1, "enc-1", use="enc"),
        rsa_jwk(keys.rsa1, "ops-1", key_ops=["encrypt"]),
        rsa_jwk(keys.rsa1, "alg-1", alg="HS256"),
        {"kty": "oct", "kid": "oct-1", "k": b64(SECRET.encode())},
        rsa_jwk(weak, "weak-1"),
        "not a key",
        rsa_jwk(keys.rsa1, "rsa-1"),
    ]
    verifier = await make_verifier(jwks_url=jwks.url)
    assert (await verifier.verify(signed(keys.rsa1, "RS256", "rsa-1"))).sub == USER
    for kid in ("enc-1", "ops-1", "alg-1"):
        token = signed(keys.rsa1, "RS256", kid)
        assert await rejected(verifier, token) == "token signing key is unknown"
    with pytest.warns(jwt.InsecureKeyLengthWarning):
        weak_token = signed(weak, "RS256", "weak-1")
    assert await rejected(verifier, weak_token) == "token signing key is unknown"
    oct_token = jwt.encode(claims(), SECRET, algorithm="HS256", headers={"kid": "oct-1"})
    assert await rejected(verifier, oct_token) == "token algorithm is not allowed"


async def test_token_without_kid(make_verifier: Factory, jwks: JWKSServer, keys: Keys) -> None:
    several = await make_verifier(jwks_url=jwks.url)
    no_kid = signed(keys.rsa1, "RS256", None)
    assert await rejected(several, no_kid) == "token has no kid"
    jwks.keys = [rsa_jwk(keys.rsa1, None)]
    single = await make_verifier(jwks_url=jwks.url)
    assert (await single.verify(no_kid)).sub == USER


# --- the key cache: refetch on unknown kid, rate limit, single flight, refresh ---


async def test_rotation_after_one_refetch(
    make_verifier: Factory, jwks: JWKSServer, keys: Keys
) -> None:
    clock = Clock()
    verifier = await make_verifier(jwks_url=jwks.url, clock=clock, min_refetch_interval=30)
    assert jwks.fetches == 1
    jwks.keys.append(rsa_jwk(keys.rsa2, "rsa-2"))
    rotated = signed(keys.rsa2, "RS256", "rsa-2")
    # Right after the initial fetch, an unknown kid may not make the issuer work again.
    assert await rejected(verifier, rotated) == "token signing key is unknown"
    assert jwks.fetches == 1
    clock.now += 30
    # Concurrent requests needing the new key all wait for one shared fetch.
    results = await asyncio.gather(*(verifier.verify(rotated) for _ in range(20)))
    assert {result.sub for result in results} == {USER}
    assert jwks.fetches == 2
    assert (await verifier.verify(rotated)).sub == USER
    assert jwks.fetches == 2


async def test_unknown_kid_flood_fetches_once(
    make_verifier: Factory, jwks: JWKSServer, keys: Keys
) -> None:
    clock = Clock()
    verifier = await make_verifier(jwks_url=jwks.url, clock=clock)

    async def flood() -> None:
        tokens = [signed(keys.rsa1, "RS256", uuid.uuid4().hex) for _ in range(50)]
        results = await asyncio.gather(
            *(verifier.verify(t) for t in tokens), return_exceptions=True
        )
        for result in results:
            assert isinstance(result, InvalidToken)
            assert result.reason == "token signing key is unknown"

    clock.now += 31
    await flood()
    assert jwks.fetches == 2
    clock.now += 29
    await flood()
    assert jwks.fetches == 2
    clock.now += 1
    await flood()
    assert jwks.fetches == 3
    assert (await verifier.verify(signed(keys.rsa1, "RS256", "rsa-1"))).sub == USER


async def test_url_down_at_start_then_back(
    make_verifier: Factory, jwks: JWKSServer, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    jwks.down = True
    with caplog.at_level(logging.WARNING, logger="gateway.auth.tokens"):
        verifier = await make_verifier(jwks_url=jwks.url, clock=clock)
    assert any("starting without JWKS keys" in r.getMessage() for r in caplog.records)
    token = signed(keys.rsa1, "RS256", "rsa-1")
    assert await rejected(verifier, token) == "token signing key is unknown"
    assert jwks.fetches == 1
    jwks.down = False
    assert await rejected(verifier, token) == "token signing key is unknown"
    assert jwks.fetches == 1
    clock.now += 30
    assert (await verifier.verify(token)).sub == USER
    assert jwks.fetches == 2


async def test_url_unreachable_at_start(
    make_verifier: Factory, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.auth.tokens"):
        verifier = await make_verifier(jwks_url="http://127.0.0.1:9/jwks.json")
    assert any("JWKS fetch from" in r.getMessage() for r in caplog.records)
    token = signed(keys.rsa1, "RS256", "rsa-1")
    assert await rejected(verifier, token) == "token signing key is unknown"


async def test_refresh_interval_revokes_removed_keys(
    make_verifier: Factory, jwks: JWKSServer, keys: Keys
) -> None:
    clock = Clock()
    verifier = await make_verifier(jwks_url=jwks.url, clock=clock, refresh_interval=600)
    old = signed(keys.rsa1, "RS256", "rsa-1")
    jwks.keys = [rsa_jwk(keys.rsa2, "rsa-2")]
    clock.now += 599
    assert (await verifier.verify(old)).sub == USER
    assert jwks.fetches == 1
    clock.now += 1
    # Stale keys still serve while the refresh runs in the background.
    assert (await verifier.verify(old)).sub == USER
    # A verify needing a key joins the fetch in flight rather than starting another.
    stranger = signed(keys.rsa1, "RS256", "stranger")
    assert await rejected(verifier, stranger) == "token signing key is unknown"
    assert jwks.fetches == 2
    assert await rejected(verifier, old) == "token signing key is unknown"
    assert (await verifier.verify(signed(keys.rsa2, "RS256", "rsa-2"))).sub == USER
    assert jwks.fetches == 2


async def test_close_cancels_a_fetch_in_flight(
    make_verifier: Factory, jwks: JWKSServer, keys: Keys
) -> None:
    clock = Clock()
    verifier = await make_verifier(jwks_url=jwks.url, clock=clock)
    jwks.hang, jwks.requested = asyncio.Event(), asyncio.Event()
    clock.now += 30
    waiting = asyncio.create_task(verifier.verify(signed(keys.rsa2, "RS256", "rsa-2")))
    async with asyncio.timeout(2):
        await jwks.requested.wait()
    await verifier.close()
    with pytest.raises(InvalidToken):
        await waiting
    jwks.hang.set()


async def test_owned_session_closed_a_given_one_left_open(
    jwks: JWKSServer, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[aiohttp.ClientSession] = []
    real = aiohttp.ClientSession

    def recording(*args: Any, **kwargs: Any) -> aiohttp.ClientSession:
        session = real(*args, **kwargs)
        made.append(session)
        return session

    monkeypatch.setattr(aiohttp, "ClientSession", recording)
    verifier = TokenVerifier(jwks_url=jwks.url)
    await verifier.start()
    try:
        assert (await verifier.verify(signed(keys.rsa1, "RS256", "rsa-1"))).sub == USER
        assert len(made) == 1 and not made[0].closed
    finally:
        await verifier.close()
    assert made[0].closed  # the session it made, it closed

    async with real() as given:
        verifier = TokenVerifier(jwks_url=jwks.url, session=given)
        await verifier.start()
        assert (await verifier.verify(signed(keys.rsa1, "RS256", "rsa-1"))).sub == USER
        await verifier.close()
        assert not given.closed  # the caller's session is the caller's to close
        assert len(made) == 1
