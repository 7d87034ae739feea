"""`python -m gateway limits ...` (also `pixelcraft-limits`): an operator's view of one user's
limits, and per-user overrides that every gateway applies within
GATEWAY_RATELIMIT_OVERRIDES_REFRESH_SECONDS.

It reads the gateway's own environment (REDIS_URL, GATEWAY_REDIS_*, GATEWAY_RATELIMIT_CONFIG;
run it where the gateway runs, e.g. `set -a; . /etc/pixelcraft/gateway.env; set +a`) and talks to
Redis directly. Exit status: 0 done, 1 nothing to remove, 2 a bad argument (named), 69 Redis
unreachable, 78 an invalid policy file.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import socket
import sys
from datetime import UTC, datetime
from typing import Any

from redis.exceptions import RedisError

from gateway.limiting.backend import close, connect, describe
from gateway.limiting.operator import LimitsOperator, OperatorError, parse_until
from gateway.limiting.policies import PolicyError, load_policies
from gateway.settings import GatewaySettings
from pixelcraft.boot import EX_CONFIG, EX_UNAVAILABLE, load_settings

EPILOG = """\
examples:
  python -m gateway limits show alice
  python -m gateway limits set alice chat --rate 600/hour --burst 30 --until 7d \\
      --reason "ticket 4711: launch week"
  python -m gateway limits unset alice chat --reason "launch over"
  python -m gateway limits reset alice chat --reason "stuck after an outage"
  python -m gateway limits list-overrides
  python -m gateway limits audit --count 20

USER is the id the gateway forwards in X-User-Id: a token's sub, a trusted proxy's
X-User-Id, or ip:<address> for an anonymous client. POLICY is `default` or a rule's name.
"""


class CliSettings(GatewaySettings):
    """The gateway's settings, minus what only a serving gateway needs."""

    gateway_upstream_url: str = "http://127.0.0.1:8000"
    """Not used by the CLI"""


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m gateway limits",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--json", action="store_true", help="print JSON instead of text")
    # --json after the command too (`limits show alice --json`); SUPPRESS keeps a top-level one.
    json_option = argparse.ArgumentParser(add_help=False)
    json_option.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = sub.add_parser

    show = add(
        "show", parents=[json_option], help="a user's plan(s), overrides, buckets and leases"
    )
    show.add_argument("user")

    change = add("set", parents=[json_option], help="override a policy for a user")
    change.add_argument("user")
    change.add_argument("policy")
    change.add_argument("--rate", help='refill, "N/second|minute|hour|day"')
    change.add_argument("--burst", type=int, help="bucket capacity")
    change.add_argument("--tokens", help='token budget refill, "N/second|minute|hour|day"')
    change.add_argument("--tokens-burst", type=int, help="token budget capacity")
    change.add_argument("--concurrent", type=int, help="requests in flight at once")
    change.add_argument("--until", help="lapses after a duration (30m, 2h, 7d) or at a time")
    change.add_argument("--reason", required=True, help="why (kept in the audit stream)")
    change.add_argument("--by", help="who (default: the login name and host)")

    remove = add("unset", parents=[json_option], help="remove a user's override of a policy")
    remove.add_argument("user")
    remove.add_argument("policy")
    remove.add_argument("--reason", required=True)
    remove.add_argument("--by")

    reset = add(
        "reset", parents=[json_option], help="refill a user's buckets (one policy's, or all)"
    )
    reset.add_argument("user")
    reset.add_argument("policy", nargs="?")
    reset.add_argument("--reason", required=True)
    reset.add_argument("--by")

    add("list-overrides", parents=[json_option], help="every override, live or lapsed")
    audit = add("audit", parents=[json_option], help="the last changes, oldest first")
    audit.add_argument("--count", type=int, default=50)
    return top


def operator_name() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()} (cli)"


def when(at: float | None) -> str:
    if at is None:
        return "until removed"
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def text_show(found: dict[str, Any]) -> list[str]:
    lines = [f"user {found['user']}: plan(s) seen {', '.join(found['plans_seen'])}"]
    for o in found["overrides"]:
        state = "live" if o["live"] else "lapsed"
        values = " ".join(f"{k}={v}" for k, v in sorted(o["values"].items()))
        lines.append(
            f"  override {o['policy']}: {values} ({state}, {when(o['until'])}; by {o['by']}: "
            f"{o['reason']})"
        )
    if not found["buckets"]:
        lines.append("  no bucket in Redis: every bucket is full")
    for b in found["buckets"]:
        flag = " (override)" if b["override"] else ""
        lines.append(
            f"  bucket {b['policy']} plan {b['plan']} ({b['identity']}): {b['remaining']} of "
            f"{b['burst']} left at {b['rate']}{flag}, full in {b['reset_seconds']:g} s"
        )
    for name, held in found["leases"].items():
        lines.append(f"  leases {name}: {held} held")
    return lines


async def run(args: argparse.Namespace, settings: GatewaySettings) -> int:
    policies = load_policies(
        settings.gateway_ratelimit_config, settings.gateway_ratelimit_failure_mode
    )
    client = connect(settings)
    try:
        ops = LimitsOperator(client, policies, settings.gateway_redis_key_prefix)
        by = getattr(args, "by", None) or operator_name()
        out: Any
        if args.command == "show":
            out = await ops.show(args.user)
            lines = text_show(out)
        elif args.command == "set":
            values = {
                "rate": args.rate,
                "burst": args.burst,
                "tokens": args.tokens,
                "tokens_burst": args.tokens_burst,
                "concurrent": args.concurrent,
            }
            until = parse_until(args.until) if args.until else None
            entry = await ops.set(args.user, args.policy, values, until=until,
                                  reason=args.reason, by=by)  # fmt: skip
            out = entry.to_json()
            lines = [f"override of {entry.policy} for {entry.user} set, {when(entry.until)}"]
        elif args.command == "unset":
            removed = await ops.unset(args.user, args.policy, reason=args.reason, by=by)
            out = {"removed": removed}
            if not removed:
                print(f"no override of {args.policy} for {args.user}", file=sys.stderr)
                return 1
            lines = [f"override of {args.policy} for {args.user} removed"]
        elif args.command == "reset":
            deleted = await ops.reset(args.user, args.policy, reason=args.reason, by=by)
            out = {"deleted": deleted}
            lines = [f"{deleted} bucket(s) of {args.user} refilled"]
        elif args.command == "list-overrides":
            out = await ops.list_overrides()
            lines = [
                f"{o['user']} {o['policy']}: "
                + " ".join(f"{k}={v}" for k, v in sorted(o["values"].items()))
                + f" ({'live' if o['live'] else 'lapsed'}, {when(o['until'])}; {o['reason']})"
                for o in out
            ] or ["no overrides"]
        else:
            out = await ops.audit(args.count)
            lines = [
                f"{when(e['at'])} {e['action']} {e['user']} {e['policy']} by {e['by']}: "
                f"{e['reason']} {json.dumps(e['detail'])}"
                for e in out
            ] or ["no changes recorded"]
        print(json.dumps(out, indent=2) if args.json else "\n".join(lines))
        return 0
    finally:
        await close(client)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = load_settings(CliSettings, "gateway limits")
    try:
        return asyncio.run(run(args, settings))
    except OperatorError as exc:
        print(f"gateway limits: {exc}", file=sys.stderr)
        return 2
    except PolicyError as exc:
        print(f"gateway limits: invalid rate-limit policies in {exc.source}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EX_CONFIG
    except (RedisError, OSError) as exc:
        print(f"gateway limits: Redis at {describe(settings)}: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
