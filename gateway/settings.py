"""GatewaySettings: every GATEWAY_* variable of the contract, validated as a whole."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gateway.limiting.policies import FailureMode
from pixelcraft.fields import Host, IPNetwork, check_url, split_csv
from pixelcraft.logs import LogFormat, LogLevel

Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0)]
UserIdHeader = Literal["trusted", "any", "off"]


class GatewaySettings(BaseSettings):
    """Gateway configuration from the environment and `.env`."""

    model_config = SettingsConfigDict(
        env_file=".env",
        extra="ignore",
        case_sensitive=False,
        env_ignore_empty=True,
        use_attribute_docstrings=True,  # each variable's meaning: its docstring, below it
    )

    redis_url: str
    """Redis for rate limits: `redis://`, `rediss://` (TLS) or `unix://`; any node of a
    Cluster; with Sentinel only its credentials, database and scheme count"""
    gateway_upstream_url: str
    """The chat service, `http://` or `https://`"""
    gateway_host: Host = "0.0.0.0"
    """Address of the public ports; `0.0.0.0` or `::` listens on IPv4 and IPv6, `127.0.0.1` or
    `::1` on both loopbacks"""
    gateway_http_port: Port = 8080
    """Public HTTP port"""
    gateway_https_port: Port = 8443
    """Public HTTPS port (when TLS is configured)"""
    gateway_admin_host: Host = "127.0.0.1"
    """Address of the admin port (metrics); keep it private"""
    gateway_admin_port: Port = 9100
    """Admin port"""
    gateway_tls_cert_file: Path | None = None
    """Certificate chain (e.g. certbot's `live/<domain>/fullchain.pem`); give both or neither"""
    gateway_tls_key_file: Path | None = Field(default=None, validate_default=True)
    """Private key (e.g. `live/<domain>/privkey.pem`)"""
    gateway_acme_webroot: Path | None = None
    """Directory served at `/.well-known/acme-challenge/` for certbot `--webroot`"""
    gateway_tls_poll_seconds: Annotated[float, Field(ge=0)] = 60.0
    """How often the TLS files are checked for changes (a safety net for SIGHUP); `0` turns it
    off"""
    gateway_https_redirect: bool = True
    """With TLS on, the HTTP port redirects to HTTPS (308) except ACME challenges; `false`
    serves the API on both (development)"""
    gateway_pid_file: Path | None = None
    """Pid file written at start (by the supervisor with workers), for
    `scripts/cert-deploy-hook`"""
    gateway_ratelimit_config: Path = Path("config/ratelimits.toml")
    """Rate-limit policy file"""
    gateway_ratelimit_failure_mode: FailureMode = "local"
    """When Redis is unreachable, for policies that name none: `local` (per-process buckets),
    `open` (allow), `closed` (deny)"""
    gateway_ratelimit_enabled: bool = True
    """`false` turns rate limiting off (no policy file read, no limits, no headers); for
    benchmarks and emergencies"""
    gateway_ratelimit_timeout_ms: Annotated[int, Field(ge=1, le=10_000)] = 100
    """Deadline of each limiter round trip to Redis, 1 to 10000 ms; an error, or three misses
    in a row, open the circuit breaker"""
    gateway_ratelimit_replicas: Annotated[int, Field(ge=1, le=10_000)] = 1
    """Gateway hosts sharing one Redis; `local` fallback buckets run at rate and burst / (this
    x `GATEWAY_WORKERS`)"""
    gateway_ratelimit_lease_seconds: Annotated[float, Field(ge=1, le=3600)] = 30.0
    """Lifetime of a concurrency lease (`concurrent` policies), renewed while the request runs;
    a crashed gateway's leases lapse after it"""
    gateway_redis_key_prefix: str = Field(default="pixelcraft:", min_length=1, max_length=64)
    """Prefix of every Redis key the gateway writes"""
    gateway_redis_cluster: bool = False
    """`REDIS_URL` names a node of a Redis Cluster"""
    gateway_redis_sentinels: Annotated[list[str], NoDecode] = []
    """Comma-separated Sentinel `host:port`s: the primary is found through them (not with
    `GATEWAY_REDIS_CLUSTER`)"""
    gateway_redis_sentinel_service: str = Field(default="mymaster", min_length=1)
    """The Sentinel service name of the primary"""
    gateway_trusted_proxies: Annotated[list[IPNetwork], NoDecode] = []
    """Comma-separated CIDRs whose `X-Forwarded-For` is believed; empty trusts none"""
    gateway_user_id_header: UserIdHeader = "trusted"
    """Whose `X-User-Id` names the user: `trusted` (only a peer in `GATEWAY_TRUSTED_PROXIES`),
    `any` (every client: development; warned at boot beyond loopback) or `off` (see
    docs/gateway.md, "Identity")"""
    gateway_jwt_secret: SecretStr | None = None
    """HS256 secret (at least 32 bytes); turns on JWT mode"""
    gateway_jwks_url: str | None = None
    """JSON Web Key Set URL for RS256/ES256/EdDSA tokens; turns on JWT mode"""
    gateway_jwks_file: Path | None = None
    """The same from a file (not with `GATEWAY_JWKS_URL`); unreadable at boot: exit 69"""
    gateway_jwt_audience: str | None = None
    """Required `aud` claim, when set (Supabase: `authenticated`)"""
    gateway_jwt_issuer: str | None = None
    """Required `iss` claim, when set"""
    gateway_plan_claim: str = Field(default="plan", pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
    """The JWT claim naming the user's plan (`[plans.<name>]` in the policy file); a dotted path
    reads a nested claim, e.g. `app_metadata.plan` as Supabase issues it. Absent, or a plan the
    policy file does not have: `default`"""
    gateway_ratelimit_overrides_refresh_seconds: Annotated[float, Field(gt=0, le=60)] = 2.0
    """How often each gateway checks Redis for changed per-user overrides (`python -m gateway
    limits set`): a change applies everywhere within this time"""
    gateway_admin_api_allow: Annotated[list[IPNetwork], NoDecode] = [
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    ]
    """Comma-separated CIDRs that may use the limits API on the admin port (`/limits/...`);
    others get 403. Loopback only by default, whatever GATEWAY_ADMIN_HOST is"""
    gateway_workers: Annotated[int, Field(ge=1, le=64)] = 1
    """Worker processes (1 to 64)"""
    gateway_max_body_bytes: Annotated[int, Field(ge=1)] = 1_048_576
    """Largest request body accepted"""
    gateway_drain_seconds: Annotated[float, Field(ge=0)] = 30.0
    """On SIGTERM, how long in-flight requests and streams may finish"""
    gateway_upstream_connect_timeout: Seconds = 5.0
    """Seconds to get a connection to the upstream (pool wait included); then 504"""
    gateway_upstream_first_byte_timeout: Seconds = 60.0
    """Seconds until the upstream's response starts (covers the model's first token); then 504"""
    gateway_upstream_read_timeout: Seconds = 60.0
    """Seconds the upstream may stay silent mid-body; then the client connection is aborted"""
    gateway_upstream_pool_size: Annotated[int, Field(ge=1, le=10_000)] = 256
    """Upstream connections per worker; each open stream holds one"""
    gateway_header_timeout: Seconds = 10.0
    """Seconds a request's head may take to arrive (from the connection, or from its first byte
    on a kept-alive one); then the connection closes"""
    gateway_keepalive_timeout: Seconds = 75.0
    """Seconds an idle client keep-alive connection stays open"""
    gateway_client_body_timeout: Seconds = 30.0
    """Seconds a request body may stay silent (as nginx's `client_body_timeout`); then 408, the
    connection closes and any upstream request is aborted"""
    gateway_client_body_buffer_bytes: Annotated[int, Field(ge=65_536, le=64 << 20)] = 256 << 10
    """Request bodies up to this size (at least 65536) are received whole before an upstream
    connection is taken; larger ones take it once this much has arrived, then stream"""
    gateway_client_body_buffer_total_bytes: Annotated[int, Field(ge=65_536)] = 64 << 20
    """All request bodies held in memory at once, per worker; past it a request is a 503 with
    `Retry-After: 1`"""
    gateway_tls_handshake_timeout: Seconds = 10.0
    """Seconds a TLS handshake may take on the HTTPS port"""
    gateway_websocket_idle_timeout: Seconds = 300.0
    """Seconds a WebSocket tunnel may pass no byte either way (pings count); then both sides
    close"""
    gateway_access_log: bool = True
    """One access-log line per response (stderr, batched)"""
    gateway_public_url: str | None = None
    """The URL clients use, `https://…`: the `servers` entry of `/openapi.json` (relative when
    unset)"""
    gateway_openapi_refresh_seconds: Annotated[float, Field(ge=1)] = 60.0
    """How often the chat service's `/openapi.json` is fetched again (the last good copy is
    kept)"""
    gateway_startup_retry_seconds: Annotated[float, Field(ge=0)] = 15.0
    """How long boot keeps retrying Redis before exiting 69"""
    gateway_log_level: LogLevel = "INFO"
    """`DEBUG`, `INFO`, `WARNING` or `ERROR`"""
    gateway_log_format: LogFormat = "text"
    """`text` or `json` (one object per line)"""

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        return check_url(value, ("redis", "rediss", "unix"))

    @field_validator("gateway_redis_sentinels", mode="before")
    @classmethod
    def _split_sentinels(cls, value: object) -> object:
        items = split_csv(value)
        if isinstance(items, list):
            for item in items:
                host, _, port = item.rpartition(":")
                if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                    raise ValueError(f"{item!r} is not host:port")
        return items

    @field_validator("gateway_redis_sentinel_service")
    @classmethod
    def _cluster_or_sentinel(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("gateway_redis_cluster") and info.data.get("gateway_redis_sentinels"):
            raise ValueError(
                "GATEWAY_REDIS_CLUSTER and GATEWAY_REDIS_SENTINELS are both set: choose one"
            )
        return value

    @field_validator("gateway_upstream_url")
    @classmethod
    def _upstream_scheme(cls, value: str) -> str:
        return check_url(value, ("http", "https")).rstrip("/")

    @field_validator("gateway_public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        return None if value is None else check_url(value, ("https", "http")).rstrip("/")

    @field_validator("gateway_jwks_url")
    @classmethod
    def _jwks_scheme(cls, value: str | None) -> str | None:
        return None if value is None else check_url(value, ("https", "http"))

    @field_validator("gateway_jwks_file")
    @classmethod
    def _one_key_set(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and info.data.get("gateway_jwks_url") is not None:
            raise ValueError("set together with GATEWAY_JWKS_URL: give one key set source")
        return value

    @field_validator("gateway_tls_cert_file")
    @classmethod
    def _https_port_free(cls, cert: Path | None, info: ValidationInfo) -> Path | None:
        # With TLS on, HTTP (ACME and redirects) and HTTPS are two listeners.
        https = info.data.get("gateway_https_port")
        if cert is not None and https is not None and https == info.data.get("gateway_http_port"):
            raise ValueError("needs GATEWAY_HTTPS_PORT to differ from GATEWAY_HTTP_PORT")
        return cert

    @field_validator("gateway_tls_key_file")
    @classmethod
    def _cert_and_key_together(cls, key: Path | None, info: ValidationInfo) -> Path | None:
        # A cert that failed its own validation is absent from info.data: say nothing more.
        if "gateway_tls_cert_file" not in info.data:
            return key
        cert = info.data["gateway_tls_cert_file"]
        if cert is not None and key is None:
            raise ValueError("missing: required when GATEWAY_TLS_CERT_FILE is set")
        if cert is None and key is not None:
            raise ValueError("set without GATEWAY_TLS_CERT_FILE: give both or neither")
        return key

    @field_validator("gateway_trusted_proxies", "gateway_admin_api_allow", mode="before")
    @classmethod
    def _split_proxies(cls, value: object) -> object:
        items = split_csv(value)
        if isinstance(items, list):
            for item in items:
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError:
                    raise ValueError(f"{item!r} is not an IP address or CIDR network") from None
            return [ipaddress.ip_network(item, strict=False) for item in items]
        return items

    @field_validator("gateway_jwt_secret")
    @classmethod
    def _jwt_secret_strength(cls, value: SecretStr | None) -> SecretStr | None:
        # RFC 7518 §3.2: an HS256 key must be at least as long as the hash output (256 bits).
        if value is not None and len(value.get_secret_value().encode()) < 32:
            raise ValueError("must be at least 32 bytes long (RFC 7518 §3.2)")
        return value

    @field_validator("gateway_client_body_buffer_total_bytes")
    @classmethod
    def _total_holds_one(cls, total: int, info: ValidationInfo) -> int:
        one = info.data.get("gateway_client_body_buffer_bytes")
        if one is not None and total < one:
            raise ValueError("must be at least GATEWAY_CLIENT_BODY_BUFFER_BYTES")
        return total

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        """GATEWAY_REDIS_SENTINELS as (host, port) pairs."""
        pairs = (item.rpartition(":") for item in self.gateway_redis_sentinels)
        return [(host.strip("[]"), int(port)) for host, _, port in pairs]

    @property
    def tls_enabled(self) -> bool:
        return self.gateway_tls_cert_file is not None

    @property
    def jwt_enabled(self) -> bool:
        """JWT mode: a Bearer token decides the user, client X-User-Id is never believed."""
        return bool(self.gateway_jwt_secret or self.gateway_jwks_url or self.gateway_jwks_file)
