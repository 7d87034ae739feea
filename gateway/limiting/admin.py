"""The limits API on the admin port: the CLI's operations as JSON (gateway.limiting.operator).

Mounted at `/limits` beside `/metrics`, never on the public ports, and answered only to peers in
GATEWAY_ADMIN_API_ALLOW (loopback by default; 403 otherwise, whatever GATEWAY_ADMIN_HOST
binds). The policy file is read per request, so the API agrees with what a SIGHUP applied.

    GET    /limits/users/{user}                      plan(s) seen, overrides, buckets, leases
    PUT    /limits/users/{user}/overrides/{policy}   {"rate", "burst", "tokens", "tokens_burst",
                                                      "concurrent", "until", "reason", "by"}
    DELETE /limits/users/{user}/overrides/{policy}?reason=...&by=...
    POST   /limits/users/{user}/reset                {"policy" (optional), "reason", "by"}
    GET    /limits/overrides
    GET    /limits/audit?count=50
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from redis.exceptions import RedisError

from gateway.auth.identity import trusted_peer
from gateway.limiting.backend import close, connect
from gateway.limiting.operator import LimitsOperator, OperatorError, parse_until
from gateway.limiting.policies import PolicyError, load_policies
from gateway.settings import GatewaySettings
from pixelcraft.fields import IPNetwork
from pixelcraft.problems import PROBLEM_JSON, problem

settings_key = web.AppKey("limits_settings", GatewaySettings)
client_key: web.AppKey[Any] = web.AppKey("limits_redis")


def allowed(peer: str | None, networks: list[IPNetwork]) -> bool:
    """Whether a peer address may use the API (an unknown peer, e.g. a unix socket, may not)."""
    return peer is not None and trusted_peer(peer, networks)


def answer(status: int, title: str, detail: str, **members: Any) -> web.Response:
    body = problem(status, title, detail, "-", members)
    return web.json_response(body, status=status, content_type=PROBLEM_JSON)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Peers outside GATEWAY_ADMIN_API_ALLOW: 403. Operator mistakes: 400 naming the field."""
    if not allowed(request.remote, request.app[settings_key].gateway_admin_api_allow):
        return answer(403, "Forbidden", "the limits API answers only GATEWAY_ADMIN_API_ALLOW")
    try:
        return await handler(request)
    except OperatorError as exc:
        return answer(400, "Bad Request", str(exc))
    except PolicyError as exc:
        return answer(500, "Internal Server Error", "; ".join(exc.problems))
    except RedisError as exc:
        return answer(503, "Service Unavailable", f"Redis: {exc}")


def operator(request: web.Request) -> LimitsOperator:
    settings = request.app[settings_key]
    policies = load_policies(
        settings.gateway_ratelimit_config, settings.gateway_ratelimit_failure_mode
    )
    return LimitsOperator(request.app[client_key], policies, settings.gateway_redis_key_prefix)


async def body_of(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = json.loads(await request.read())
    except ValueError:
        raise OperatorError("body: not JSON") from None
    if not isinstance(body, dict):
        raise OperatorError("body: must be a JSON object")
    return body


def who(request: web.Request, given: object) -> str:
    if isinstance(given, str) and given.strip():
        return f"{given.strip()} (admin api)"
    return f"admin api from {request.remote}"


async def show(request: web.Request) -> web.Response:
    return web.json_response(await operator(request).show(request.match_info["user"]))


async def set_override(request: web.Request) -> web.Response:
    body = await body_of(request)
    until = body.pop("until", None)
    reason = body.pop("reason", "")
    by = who(request, body.pop("by", None))
    if not isinstance(reason, str):
        raise OperatorError("reason: must be a string")
    if until is not None and not isinstance(until, str | int | float):
        raise OperatorError("until: a duration (30m, 2h, 7d), an ISO 8601 time or Unix time")
    at = None
    if isinstance(until, str):
        at = parse_until(until)
    elif until is not None:
        at = float(until)
        if at <= time.time():
            raise OperatorError("until: not in the future")
    entry = await operator(request).set(
        request.match_info["user"], request.match_info["policy"], body, until=at,
        reason=reason, by=by,
    )  # fmt: skip
    return web.json_response(entry.to_json())


async def unset_override(request: web.Request) -> web.Response:
    query = request.query
    removed = await operator(request).unset(
        request.match_info["user"],
        request.match_info["policy"],
        reason=query.get("reason", ""),
        by=who(request, query.get("by")),
    )
    if not removed:
        return answer(404, "Not Found", "no such override")
    return web.json_response({"removed": True})


async def reset(request: web.Request) -> web.Response:
    body = await body_of(request)
    policy = body.get("policy")
    if policy is not None and not isinstance(policy, str):
        raise OperatorError("policy: must be a string")
    reason = body.get("reason", "")
    deleted = await operator(request).reset(
        request.match_info["user"],
        policy,
        reason=reason if isinstance(reason, str) else "",
        by=who(request, body.get("by")),
    )
    return web.json_response({"deleted": deleted})


async def list_overrides(request: web.Request) -> web.Response:
    return web.json_response(await operator(request).list_overrides())


async def audit(request: web.Request) -> web.Response:
    raw = request.query.get("count", "50")
    if not raw.isdigit() or not 1 <= int(raw) <= 10_000:
        raise OperatorError("count: a whole number from 1 to 10000")
    return web.json_response(await operator(request).audit(int(raw)))


def admin_limits(settings: GatewaySettings) -> web.Application | None:
    """The limits API for the admin port; None with rate limiting off."""
    return limits_app(settings) if settings.gateway_ratelimit_enabled else None


def limits_app(settings: GatewaySettings) -> web.Application:
    """The sub-application to mount at `/limits` (its own Redis client, made at startup)."""
    app = web.Application(middlewares=[guard])
    app[settings_key] = settings

    async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
        client = connect(settings)
        app[client_key] = client
        yield
        await close(client)

    app.cleanup_ctx.append(redis_ctx)
    app.router.add_get("/users/{user}", show)
    app.router.add_put("/users/{user}/overrides/{policy}", set_override)
    app.router.add_delete("/users/{user}/overrides/{policy}", unset_override)
    app.router.add_post("/users/{user}/reset", reset)
    app.router.add_get("/overrides", list_overrides)
    app.router.add_get("/audit", audit)
    return app
