"""Boot-time configuration handling shared by both services.

Loading settings turns pydantic's ValidationError into one line per problem, naming the
environment variable and never echoing a value (a URL may carry a password). The two exit codes
are the sysexits.h ones the contract promises to scripts and process supervisors.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, SecretStr, ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

EX_UNAVAILABLE = 69
EX_CONFIG = 78

MASK = "********"

logger = logging.getLogger(__name__)

S = TypeVar("S", bound=BaseModel)


def _num(value: Any) -> str:
    """0.0 as 0, 2.5 as 2.5."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def describe_error(error: Any) -> str:
    """One pydantic error as a short sentence, without the offending input."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "missing":
        return "missing"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", error["msg"]))
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "must be a whole number"
    if kind in ("float_parsing", "float_type"):
        return "must be a number"
    if kind in ("bool_parsing", "bool_type"):
        return "must be true or false"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '')}".replace("'", "")
    if kind == "greater_than_equal":
        return f"must be at least {_num(ctx['ge'])}"
    if kind == "greater_than":
        return f"must be greater than {_num(ctx['gt'])}"
    if kind == "less_than_equal":
        return f"must be at most {_num(ctx['le'])}"
    if kind == "less_than":
        return f"must be less than {_num(ctx['lt'])}"
    if kind == "string_too_short":
        return "must not be empty" if ctx.get("min_length") == 1 else error["msg"].lower()
    if kind == "string_too_long":
        return f"must be at most {ctx['max_length']} characters"
    if kind == "extra_forbidden":
        return "is not a known setting"
    return str(error["msg"])


def error_lines(exc: ValidationError) -> list[str]:
    """`VARIABLE: problem` for every error, in field order."""
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = error["loc"]
        name = str(loc[0]).upper() if loc else "SETTINGS"
        lines.append(f"{name}: {describe_error(error)}")
    return lines


def load_settings(factory: Callable[[], S], service: str) -> S:
    """Build the settings or print every problem and exit 78 (EX_CONFIG)."""
    try:
        return factory()
    except ValidationError as exc:
        lines = error_lines(exc)
        fail(EX_CONFIG, f"{service}: invalid configuration ({len(lines)} problem(s)):", lines)


def fail(code: int, headline: str, lines: Iterable[str] = ()) -> NoReturn:
    """Print a headline and indented detail lines to stderr, then exit."""
    print(headline, file=sys.stderr)
    for line in lines:
        print(f"  {line}", file=sys.stderr)
    sys.exit(code)


def mask_url(url: str) -> str:
    """The URL with any password replaced by the mask, safe to log or print."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))


def render_value(value: Any) -> str:
    """A settings value as the environment would spell it, secrets and passwords masked."""
    if isinstance(value, SecretStr):
        return MASK if value.get_secret_value() else ""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(render_value(v) for v in value)
    text = str(value)
    if "://" in text:
        return mask_url(text)
    return text


def effective_settings(settings: BaseModel) -> list[str]:
    """`VARIABLE=value` lines for --check-config."""
    return [
        f"{name.upper()}={render_value(getattr(settings, name))}"
        for name in type(settings).model_fields
    ]


class DependencyUnavailable(Exception):
    """A dependency (Redis, PostgreSQL) stayed unreachable through the boot retries: exit 69."""


def boot_retrying(
    what: str, budget: float, retry_on: tuple[type[BaseException], ...]
) -> AsyncRetrying:
    """Retries for a dependency at boot: exponential backoff (0.2 s doubling, at most 3 s
    apart) for `budget` seconds, each failed attempt logged naming `what`; the last error is
    re-raised for the caller to turn into DependencyUnavailable."""

    def log_attempt(state: RetryCallState) -> None:
        logger.warning("%s not reachable yet (attempt %d)", what, state.attempt_number)

    return AsyncRetrying(
        retry=retry_if_exception_type(retry_on),
        wait=wait_exponential(multiplier=0.2, max=3),
        stop=stop_after_delay(budget),
        before_sleep=log_attempt,
        reraise=True,
    )


def command_line(
    prog: str, description: str, argv: list[str] | None, *, hidden: tuple[str, ...] = ()
) -> argparse.Namespace:
    """Arguments shared by both services: --check-config, plus internal options not in --help
    (each takes an integer, None when absent)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration, print the effective settings (secrets masked), exit",
    )
    for flag in hidden:
        parser.add_argument(flag, type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def check_config(settings: BaseModel, extra: Iterable[str] = ()) -> NoReturn:
    """--check-config: the effective settings, secrets masked, `extra` lines, then exit 0."""
    print("\n".join(effective_settings(settings)))
    for line in extra:
        print(line)
    print("configuration OK")
    sys.exit(0)
