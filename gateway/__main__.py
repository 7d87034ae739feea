"""`python -m gateway`: validate the environment, check Redis, then serve."""

from __future__ import annotations

import gateway.tls.openssl  # noqa: F401  (first: sets OPENSSL_CONF before OpenSSL loads)

# isort: split
import os
import sys

import uvloop

from gateway.limiting.policies import Policies, Policy, PolicyError, load_policies
from gateway.serving.server import Worker, serve
from gateway.serving.supervisor import supervise
from gateway.settings import GatewaySettings
from pixelcraft import logs
from pixelcraft.boot import (
    EX_CONFIG,
    EX_UNAVAILABLE,
    DependencyUnavailable,
    check_config,
    command_line,
    fail,
    load_settings,
)

DESCRIPTION = (
    "PixelCraft gateway: the edge every external request passes through. Configured by "
    "environment variables (and .env); see README.md. Exits 78 on invalid configuration, 69 "
    "when Redis stays unreachable. Rate-limit policies come from GATEWAY_RATELIMIT_CONFIG "
    "(config/ratelimits.toml). SIGTERM drains in-flight requests and exits 0; SIGHUP reloads the "
    "policies. `python -m gateway limits --help`: the operator's view of a user's limits and "
    "per-user overrides."
)


def policy_lines(policies: Policies | None) -> list[str]:
    """What --check-config prints about the rate-limit policies."""
    if policies is None:
        return ["rate limiting: off"]
    lines = ["rate-limit policies (first matching rule, else default; ip applies to all):"]
    for rule in policies.rules:
        methods = ",".join(sorted(rule.methods)) if rule.methods else "*"
        lines.append(f"  {describe(rule.policy)} for {methods} {rule.prefix}")
    lines.append(f"  {describe(policies.default)}")
    if policies.ip is not None:
        lines.append(f"  {describe(policies.ip)} per client address")
    return lines


def describe(policy: Policy) -> str:
    return (
        f"{policy.name}: {policy.rate_text}, burst {policy.burst}, cost {policy.cost}, "
        f"failure_mode {policy.failure_mode}"
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["limits"]:  # the operator's CLI: gateway.limiting.cli
        from gateway.limiting import cli

        sys.exit(cli.main(argv[1:]))
    # --worker N (internal): worker N of GATEWAY_WORKERS processes started by the supervisor.
    args = command_line("python -m gateway", DESCRIPTION, argv, hidden=("--worker",))
    settings = load_settings(GatewaySettings, "gateway")
    policies = None
    if settings.gateway_ratelimit_enabled:
        try:
            policies = load_policies(
                settings.gateway_ratelimit_config, settings.gateway_ratelimit_failure_mode
            )
        except PolicyError as exc:
            fail(
                EX_CONFIG,
                f"gateway: invalid rate-limit policies in {exc.source} (GATEWAY_RATELIMIT_CONFIG):",
                exc.problems,
            )
    if args.check_config:
        check_config(settings, policy_lines(policies))
    logs.configure(settings.gateway_log_level, settings.gateway_log_format)
    try:
        if args.worker is not None:
            # The supervisor's shared directory: prometheus_client reads this variable itself
            # (at import, to choose its multiprocess mode); the gateway reads it here, once.
            worker = Worker(args.worker, os.environ["PROMETHEUS_MULTIPROC_DIR"])
            uvloop.run(serve(settings, policies, worker=worker))
        elif settings.gateway_workers > 1:
            sys.exit(uvloop.run(supervise(settings)))
        else:
            uvloop.run(serve(settings, policies))
    except DependencyUnavailable as exc:
        fail(EX_UNAVAILABLE, f"gateway: {exc}")
    except OSError as exc:
        fail(EX_UNAVAILABLE, f"gateway: cannot listen: {exc}")


if __name__ == "__main__":
    main()
