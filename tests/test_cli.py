"""The two entry points as processes: exit codes 78 and 69, --check-config, start and stop."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import aiohttp

from devtools.services import free_port
from tests.conftest import service_env
from tests.support.processes import Launcher


def run(module: str, *args: str, **env: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env=service_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_upstream_bad_config_exits_78_listing_every_problem(tmp_path: Any) -> None:
    port = free_port()
    done = run(
        "upstream",
        DATABASE_URL="mysql://root:db-password@127.0.0.1/app",
        UPSTREAM_LLM_PROVIDER="openai",
        UPSTREAM_PORT=str(port),
        DB_POOL_MAX_SIZE="zero",
    )
    assert done.returncode == 78
    assert done.stderr.splitlines()[1:] == [
        "  DATABASE_URL: must start with postgres:// or postgresql://",
        "  OPENAI_API_KEY: missing: required when UPSTREAM_LLM_PROVIDER=openai",
        "  DB_POOL_MAX_SIZE: must be a whole number",
    ]
    assert "db-password" not in done.stderr + done.stdout


def test_gateway_bad_config_exits_78_without_secrets() -> None:
    done = run(
        "gateway",
        REDIS_URL="http://:redis-password@cache:6379",
        GATEWAY_JWT_SECRET="tiny-secret",
    )
    assert done.returncode == 78
    assert "REDIS_URL: must start with redis://, rediss:// or unix://" in done.stderr
    assert "GATEWAY_UPSTREAM_URL: missing" in done.stderr
    assert "GATEWAY_JWT_SECRET: must be at least 32 bytes long" in done.stderr
    assert "redis-password" not in done.stderr and "tiny-secret" not in done.stderr


def test_check_config_prints_effective_settings_masked() -> None:
    done = run(
        "upstream",
        "--check-config",
        DATABASE_URL="postgresql://app:db-password@127.0.0.1:5432/app",
        OPENAI_API_KEY="sk-live-very-secret",
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "DATABASE_URL=postgresql://app:********@127.0.0.1:5432/app" in lines
    assert "OPENAI_API_KEY=********" in lines
    assert "UPSTREAM_LLM_PROVIDER=openai" in lines and "DB_POOL_MAX_SIZE=30" in lines
    assert "db-password" not in done.stdout and "sk-live" not in done.stdout
    done = run(
        "gateway",
        "--check-config",
        REDIS_URL="redis://127.0.0.1:6379",
        GATEWAY_UPSTREAM_URL="http://127.0.0.1:8000",
    )
    assert done.returncode == 0 and "GATEWAY_HTTP_PORT=8080" in done.stdout.splitlines()
    # the shipped policy file, summarised
    assert "  chat: 20/minute, burst 5, cost 1, failure_mode closed for POST /v1/chat" in (
        done.stdout.splitlines()
    )


def test_bad_policy_file_exits_78_naming_every_bad_key(tmp_path: Any) -> None:
    path = tmp_path / "ratelimits.toml"
    path.write_text('[default]\nrate = "lots"\n[[rules]]\nname = "chat"\nrate = "1/minute"\n')
    for args in ((), ("--check-config",)):
        done = run(
            "gateway",
            *args,
            REDIS_URL="redis://127.0.0.1:6379",
            GATEWAY_UPSTREAM_URL="http://127.0.0.1:8000",
            GATEWAY_HTTP_PORT=str(free_port()),
            GATEWAY_RATELIMIT_CONFIG=str(path),
        )
        assert done.returncode == 78, done.stderr
        assert done.stderr.splitlines() == [
            f"gateway: invalid rate-limit policies in {path} (GATEWAY_RATELIMIT_CONFIG):",
            '  default.rate: must be "N/second", "N/minute", "N/hour" or "N/day" with N > 0',
            '  rules[0].path_prefix: missing or not starting with "/"',
        ]


def test_help_describes_the_service() -> None:
    for module in ("gateway", "upstream"):
        done = run(module, "--help")
        assert done.returncode == 0 and "--check-config" in done.stdout and "78" in done.stdout


def test_unreachable_redis_exits_69_naming_it() -> None:
    port = free_port()
    done = run(
        "gateway",
        REDIS_URL=f"redis://:redis-password@127.0.0.1:{port}/0",
        GATEWAY_UPSTREAM_URL="http://127.0.0.1:8000",
        GATEWAY_HTTP_PORT=str(free_port()),
        GATEWAY_STARTUP_RETRY_SECONDS="0.5",
    )
    assert done.returncode == 69, done.stderr
    assert f"Redis at 127.0.0.1:{port} unreachable (REDIS_URL)" in done.stderr
    assert "redis-password" not in done.stderr


def test_unreachable_postgres_exits_69_naming_it() -> None:
    port = free_port()
    done = run(
        "upstream",
        DATABASE_URL=f"postgresql://app:db-password@127.0.0.1:{port}/app",
        UPSTREAM_LLM_PROVIDER="local",
        UPSTREAM_PORT=str(free_port()),
        UPSTREAM_STARTUP_RETRY_SECONDS="0.5",
    )
    assert done.returncode == 69, done.stderr
    assert f"PostgreSQL at 127.0.0.1:{port}/app unreachable" in done.stderr
    assert "db-password" not in done.stderr


async def test_both_services_start_serve_and_stop_on_sigterm(
    launcher: Launcher, database_url: str, redis_url: str, key_prefix: str
) -> None:
    upstream = await launcher.upstream(database_url=database_url)
    gateway = await launcher.gateway(
        redis_url=redis_url, upstream_url=upstream.url, key_prefix=f"{key_prefix}cli:"
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{gateway.url}/v1/chat",
            json={"message": "hello from a process"},
            headers={"X-User-Id": "cli-test"},
        ) as resp,
    ):
        body = await resp.text()
        assert resp.status == 200 and "event: done" in body
    assert await gateway.stop() == 0
    assert await upstream.stop() == 0
