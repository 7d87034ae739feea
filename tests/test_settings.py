"""Both services' settings: every variable's default, missing and malformed cases."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from gateway.settings import GatewaySettings
from pixelcraft.boot import effective_settings, error_lines, mask_url
from upstream.settings import UpstreamSettings

GATEWAY_REQUIRED = {
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "GATEWAY_UPSTREAM_URL": "http://127.0.0.1:8000",
}
UPSTREAM_REQUIRED = {
    "DATABASE_URL": "postgresql://app@127.0.0.1:5432/app",
    "UPSTREAM_LLM_PROVIDER": "local",
}


def problems(factory: type[Any], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        factory(_env_file=None)
    except ValidationError as exc:
        return error_lines(exc)
    return []


def test_gateway_defaults(clean_env: pytest.MonkeyPatch) -> None:
    for name, value in GATEWAY_REQUIRED.items():
        clean_env.setenv(name, value)
    s = GatewaySettings(_env_file=None)
    assert (s.gateway_host, s.gateway_http_port, s.gateway_https_port) == ("0.0.0.0", 8080, 8443)
    assert (s.gateway_admin_host, s.gateway_admin_port) == ("127.0.0.1", 9100)
    assert s.gateway_tls_cert_file is None and s.gateway_tls_key_file is None and not s.tls_enabled
    assert s.gateway_acme_webroot is None
    assert s.gateway_ratelimit_config == Path("config/ratelimits.toml")
    assert s.gateway_ratelimit_failure_mode == "local"
    assert s.gateway_trusted_proxies == []
    assert s.gateway_jwt_secret is None and s.gateway_jwt_audience is None
    assert s.gateway_workers == 1
    assert s.gateway_max_body_bytes == 1_048_576
    assert s.gateway_drain_seconds == 30
    assert (s.gateway_upstream_connect_timeout, s.gateway_upstream_read_timeout) == (5, 60)


def test_upstream_defaults(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DATABASE_URL", UPSTREAM_REQUIRED["DATABASE_URL"])
    clean_env.setenv("OPENAI_API_KEY", "sk-test")
    s = UpstreamSettings(_env_file=None)
    assert s.upstream_llm_provider == "openai"
    assert s.openai_base_url == "https://api.openai.com/v1" and s.openai_model == "gpt-4o-mini"
    assert (s.upstream_host, s.upstream_port) == ("127.0.0.1", 8000)
    assert (s.db_pool_min_size, s.db_pool_max_size) == (2, 30)
    assert s.db_pool_acquire_timeout == 5 and s.db_statement_cache_size == 100


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("REDIS_URL", None, "REDIS_URL: missing"),
        (
            "REDIS_URL",
            "postgres://127.0.0.1/x",
            "REDIS_URL: must start with redis://, rediss:// or unix://",
        ),
        ("REDIS_URL", "redis://", "REDIS_URL: has no host"),
        ("REDIS_URL", "redis://h:99999", "REDIS_URL: is not a valid URL (check the port)"),
        ("GATEWAY_UPSTREAM_URL", None, "GATEWAY_UPSTREAM_URL: missing"),
        (
            "GATEWAY_UPSTREAM_URL",
            "ftp://x",
            "GATEWAY_UPSTREAM_URL: must start with http:// or https://",
        ),
        (
            "GATEWAY_UPSTREAM_URL",
            "127.0.0.1:8000",
            "GATEWAY_UPSTREAM_URL: must start with http:// or https://",
        ),
        (
            "GATEWAY_HOST",
            "http://0.0.0.0",
            "GATEWAY_HOST: must be an IP address or a host name (no scheme or port)",
        ),
        (
            "GATEWAY_ADMIN_HOST",
            "localhost:9100",
            "GATEWAY_ADMIN_HOST: must be an IP address or a host name (no scheme or port)",
        ),
        ("GATEWAY_HTTP_PORT", "http", "GATEWAY_HTTP_PORT: must be a whole number"),
        ("GATEWAY_HTTP_PORT", "0", "GATEWAY_HTTP_PORT: must be at least 1"),
        ("GATEWAY_HTTPS_PORT", "70000", "GATEWAY_HTTPS_PORT: must be at most 65535"),
        ("GATEWAY_ADMIN_PORT", "-1", "GATEWAY_ADMIN_PORT: must be at least 1"),
        (
            "GATEWAY_TLS_CERT_FILE",
            "/etc/cert.pem",
            "GATEWAY_TLS_KEY_FILE: missing: required when GATEWAY_TLS_CERT_FILE is set",
        ),
        (
            "GATEWAY_TLS_KEY_FILE",
            "/etc/key.pem",
            "GATEWAY_TLS_KEY_FILE: set without GATEWAY_TLS_CERT_FILE: give both or neither",
        ),
        (
            "GATEWAY_RATELIMIT_FAILURE_MODE",
            "maybe",
            "GATEWAY_RATELIMIT_FAILURE_MODE: must be one of local, open or closed",
        ),
        (
            "GATEWAY_TRUSTED_PROXIES",
            "10.0.0.0/8,10.0.0.300",
            "GATEWAY_TRUSTED_PROXIES: '10.0.0.300' is not an IP address or CIDR network",
        ),
        (
            "GATEWAY_JWT_SECRET",
            "too-short",
            "GATEWAY_JWT_SECRET: must be at least 32 bytes long (RFC 7518 §3.2)",
        ),
        ("GATEWAY_WORKERS", "0", "GATEWAY_WORKERS: must be at least 1"),
        ("GATEWAY_WORKERS", "two", "GATEWAY_WORKERS: must be a whole number"),
        ("GATEWAY_MAX_BODY_BYTES", "0", "GATEWAY_MAX_BODY_BYTES: must be at least 1"),
        ("GATEWAY_DRAIN_SECONDS", "soon", "GATEWAY_DRAIN_SECONDS: must be a number"),
        (
            "GATEWAY_UPSTREAM_CONNECT_TIMEOUT",
            "0",
            "GATEWAY_UPSTREAM_CONNECT_TIMEOUT: must be greater than 0",
        ),
        ("GATEWAY_UPSTREAM_READ_TIMEOUT", "x", "GATEWAY_UPSTREAM_READ_TIMEOUT: must be a number"),
        (
            "GATEWAY_LOG_LEVEL",
            "LOUD",
            "GATEWAY_LOG_LEVEL: must be one of DEBUG, INFO, WARNING or ERROR",
        ),
        ("GATEWAY_LOG_FORMAT", "xml", "GATEWAY_LOG_FORMAT: must be one of text or json"),
    ],
)
def test_gateway_variable_problems(
    clean_env: pytest.MonkeyPatch, name: str, value: str | None, expected: str
) -> None:
    env = dict(GATEWAY_REQUIRED)
    if value is None:
        env.pop(name)
    else:
        env[name] = value
    assert problems(GatewaySettings, env, clean_env) == [expected]


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("DATABASE_URL", None, "DATABASE_URL: missing"),
        (
            "DATABASE_URL",
            "redis://127.0.0.1:6379",
            "DATABASE_URL: must start with postgres:// or postgresql://",
        ),
        (
            "DATABASE_URL",
            "mysql://h/db",
            "DATABASE_URL: must start with postgres:// or postgresql://",
        ),
        (
            "UPSTREAM_LLM_PROVIDER",
            "anthropic",
            "UPSTREAM_LLM_PROVIDER: must be one of openai or local",
        ),
        (
            "UPSTREAM_LLM_PROVIDER",
            "openai",
            "OPENAI_API_KEY: missing: required when UPSTREAM_LLM_PROVIDER=openai",
        ),
        (
            "OPENAI_BASE_URL",
            "api.openai.com/v1",
            "OPENAI_BASE_URL: must start with http:// or https://",
        ),
        ("OPENAI_CONNECT_TIMEOUT", "-2", "OPENAI_CONNECT_TIMEOUT: must be greater than 0"),
        ("OPENAI_READ_TIMEOUT", "slow", "OPENAI_READ_TIMEOUT: must be a number"),
        ("OPENAI_MAX_RETRIES", "11", "OPENAI_MAX_RETRIES: must be at most 10"),
        ("UPSTREAM_PORT", "eighty", "UPSTREAM_PORT: must be a whole number"),
        ("UPSTREAM_PORT", "65536", "UPSTREAM_PORT: must be at most 65535"),
        ("DB_POOL_MIN_SIZE", "-1", "DB_POOL_MIN_SIZE: must be at least 0"),
        ("DB_POOL_MAX_SIZE", "0", "DB_POOL_MAX_SIZE: must be at least 1"),
        ("DB_POOL_MAX_SIZE", "1", "DB_POOL_MAX_SIZE: must be at least DB_POOL_MIN_SIZE (2)"),
        ("DB_POOL_ACQUIRE_TIMEOUT", "0", "DB_POOL_ACQUIRE_TIMEOUT: must be greater than 0"),
        ("DB_STATEMENT_CACHE_SIZE", "-5", "DB_STATEMENT_CACHE_SIZE: must be at least 0"),
        ("UPSTREAM_LOCAL_TOKEN_DELAY", "fast", "UPSTREAM_LOCAL_TOKEN_DELAY: must be a number"),
        (
            "UPSTREAM_HOST",
            "0.0.0.0:8000",
            "UPSTREAM_HOST: must be an IP address or a host name (no scheme or port)",
        ),
        ("UPSTREAM_DRAIN_SECONDS", "-1", "UPSTREAM_DRAIN_SECONDS: must be at least 0"),
        (
            "UPSTREAM_STARTUP_RETRY_SECONDS",
            "later",
            "UPSTREAM_STARTUP_RETRY_SECONDS: must be a number",
        ),
        (
            "UPSTREAM_LOG_LEVEL",
            "verbose",
            "UPSTREAM_LOG_LEVEL: must be one of DEBUG, INFO, WARNING or ERROR",
        ),
        ("UPSTREAM_LOG_FORMAT", "yaml", "UPSTREAM_LOG_FORMAT: must be one of text or json"),
    ],
)
def test_upstream_variable_problems(
    clean_env: pytest.MonkeyPatch, name: str, value: str | None, expected: str
) -> None:
    env = dict(UPSTREAM_REQUIRED)
    if value is None:
        env.pop(name)
    else:
        env[name] = value
    assert problems(UpstreamSettings, env, clean_env) == [expected]


def test_every_problem_is_reported_at_once(clean_env: pytest.MonkeyPatch) -> None:
    env = {
        "GATEWAY_UPSTREAM_URL": "nope",
        "GATEWAY_HTTP_PORT": "x",
        "GATEWAY_TLS_KEY_FILE": "/k.pem",
        "GATEWAY_JWT_SECRET": "hunter2",
    }
    lines = problems(GatewaySettings, env, clean_env)
    assert [line.split(":")[0] for line in lines] == [
        "REDIS_URL",
        "GATEWAY_UPSTREAM_URL",
        "GATEWAY_HTTP_PORT",
        "GATEWAY_TLS_KEY_FILE",
        "GATEWAY_JWT_SECRET",
    ]
    assert not any("hunter2" in line for line in lines)


def test_empty_variable_counts_as_unset(clean_env: pytest.MonkeyPatch) -> None:
    assert problems(GatewaySettings, {**GATEWAY_REQUIRED, "REDIS_URL": ""}, clean_env) == [
        "REDIS_URL: missing"
    ]
    clean_env.setenv("REDIS_URL", GATEWAY_REQUIRED["REDIS_URL"])
    clean_env.setenv("GATEWAY_JWT_SECRET", "")
    assert GatewaySettings(_env_file=None).gateway_jwt_secret is None


def test_dotenv_is_read_and_environment_wins(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "REDIS_URL=redis://from-dotenv:6379\nGATEWAY_UPSTREAM_URL=http://up:8000/\nGATEWAY_HTTP_PORT=9000\n"
    )
    clean_env.setenv("GATEWAY_HTTP_PORT", "9001")
    s = GatewaySettings()
    assert s.redis_url == "redis://from-dotenv:6379"
    assert s.gateway_upstream_url == "http://up:8000"
    assert s.gateway_http_port == 9001


def test_hosts_and_log_levels_are_accepted_in_their_usual_spellings(
    clean_env: pytest.MonkeyPatch,
) -> None:
    for name, value in GATEWAY_REQUIRED.items():
        clean_env.setenv(name, value)
    clean_env.setenv("GATEWAY_HOST", "[::]")
    clean_env.setenv("GATEWAY_ADMIN_HOST", "metrics.internal")
    clean_env.setenv("GATEWAY_LOG_LEVEL", "debug")
    s = GatewaySettings(_env_file=None)
    assert (s.gateway_host, s.gateway_admin_host, s.gateway_log_level) == (
        "::",
        "metrics.internal",
        "DEBUG",
    )


def test_trusted_proxies_parse_as_networks(clean_env: pytest.MonkeyPatch) -> None:
    for name, value in GATEWAY_REQUIRED.items():
        clean_env.setenv(name, value)
    clean_env.setenv("GATEWAY_TRUSTED_PROXIES", " 10.0.0.0/8, 192.168.1.7 ,::1")
    s = GatewaySettings(_env_file=None)
    assert s.gateway_trusted_proxies == [
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.1.7/32"),
        ipaddress.ip_network("::1/128"),
    ]


def test_effective_settings_mask_secrets(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("REDIS_URL", "redis://:redis-pass@cache:6379/0")
    clean_env.setenv("GATEWAY_UPSTREAM_URL", "http://up:8000")
    clean_env.setenv("GATEWAY_JWT_SECRET", "s" * 40)
    lines = effective_settings(GatewaySettings(_env_file=None))
    text = "\n".join(lines)
    assert "redis-pass" not in text and "s" * 40 not in text
    assert "REDIS_URL=redis://:********@cache:6379/0" in lines
    assert "GATEWAY_JWT_SECRET=********" in lines
    assert "GATEWAY_HTTP_PORT=8080" in lines


def test_mask_url_keeps_everything_but_the_password() -> None:
    assert mask_url("postgresql://app:pw@[::1]:5433/db?sslmode=require") == (
        "postgresql://app:********@[::1]:5433/db?sslmode=require"
    )
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
