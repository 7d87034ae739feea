"""The gateway's /openapi.json: the upstream's document, merged with the gateway's own operations
and annotated with what the gateway adds to every proxied call.

`merge` is pure. `ApiDocument` keeps the last good copy of the upstream's document (fetched at
boot and every GATEWAY_OPENAPI_REFRESH_SECONDS by a background task, never by a request) and the
merged bytes, rebuilt only when that copy or the policies (SIGHUP) change. For each proxied
operation the merge adds:
- `x-ratelimit`: the policies the limiter applies to that method and path, as the limiter
  itself matches them (the same `Policies.match`), plus the per-address ceiling;
- a 429 response (draft-ietf-httpapi-ratelimit-headers-10 quota-exceeded problem, Retry-After),
  the RateLimit / RateLimit-Policy / X-RateLimit-* headers on every response, 502/504 for the
  upstream failing, 413 for bodies over GATEWAY_MAX_BODY_BYTES;
- identity: in JWT mode the bearer scheme (optional: anonymous calls are limited by address) and
  no X-User-Id parameter (the gateway sets it); otherwise X-User-Id becomes optional.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.limiting.policies import Policies, Policy
from pixelcraft.aio import cancel
from pixelcraft.contract import ANONYMOUS_PREFIX, USER_ID_PATTERN
from pixelcraft.problems import PROBLEM_JSON

logger = logging.getLogger(__name__)

QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
RETRY_WHILE_EMPTY = 5.0  # seconds between fetches while no good copy is held

HEADERS: dict[str, Any] = {
    "RateLimit-Policy": {
        "description": 'Each policy that applied: `"name";q=<burst>;w=<seconds to refill an '
        "empty bucket>` (draft-ietf-httpapi-ratelimit-headers-10).",
        "schema": {"type": "string", "example": '"chat";q=5;w=15, "ip";q=600;w=60'},
    },
    "RateLimit": {
        "description": 'Each policy\'s state: `"name";r=<whole tokens left>;t=<seconds until at '
        "least one token; 0 while r >= 1>`.",
        "schema": {"type": "string", "example": '"chat";r=4;t=0, "ip";r=599;t=0'},
    },
    "X-RateLimit-Limit": {
        "description": "Burst of the tightest policy (legacy).",
        "schema": {"type": "integer", "example": 5},
    },
    "X-RateLimit-Remaining": {
        "description": "Tokens left in the tightest policy (legacy).",
        "schema": {"type": "integer", "example": 4},
    },
    "X-RateLimit-Reset": {
        "description": "Seconds until the tightest policy's bucket is full again (legacy).",
        "schema": {"type": "integer", "example": 3},
    },
}
RETRY_AFTER = {
    "description": "Seconds to wait before retrying; never earlier than the RateLimit `t`.",
    "schema": {"type": "integer", "example": 3},
}

GATEWAY_SCHEMAS: dict[str, Any] = {
    "GatewayProblem": {
        "type": "object",
        "description": "An RFC 9457 problem answered by the gateway itself.",
        "properties": {
            "type": {"type": "string", "example": "about:blank"},
            "title": {"type": "string", "example": "Bad Gateway"},
            "status": {"type": "integer", "example": 502},
            "detail": {"type": "string", "example": "could not connect to the upstream"},
            "request_id": {"type": "string", "example": "9f1c2d3e4b5a69788796a5b4c3d2e1f0"},
        },
        "required": ["type", "title", "status", "detail"],
    },
    "QuotaExceeded": {
        "type": "object",
        "description": "429: a rate-limit policy has no tokens left for this request.",
        "properties": {
            "type": {"type": "string", "enum": [QUOTA_EXCEEDED]},
            "title": {"type": "string", "example": "Too Many Requests"},
            "status": {"type": "integer", "enum": [429]},
            "detail": {
                "type": "string",
                "example": 'rate limit "chat" exceeded: 5 tokens, refilled at 20/minute; this '
                "request can be retried in 3 s",
            },
            "violated-policies": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Every policy that denied the request.",
                "example": ["chat"],
            },
            "retry_after": {"type": "integer", "description": "Seconds to wait.", "example": 3},
            "plan": {
                "type": "string",
                "description": "The caller's plan whose version of the policy denied "
                "(`default` for everyone without one); see `x-ratelimit-plans`.",
                "example": "default",
            },
            "override": {
                "type": "boolean",
                "description": "Present (true) when an operator's override of the policy for "
                "this user denied.",
            },
            "request_id": {"type": "string", "example": "9f1c2d3e4b5a69788796a5b4c3d2e1f0"},
        },
        "required": ["type", "title", "status", "detail", "violated-policies", "retry_after"],
    },
}


def _gateway_problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/GatewayProblem"}}},
    }


def policy_object(policy: Policy, key: str) -> dict[str, Any]:
    """One policy as `x-ratelimit` shows it."""
    return {
        "policy": policy.name,
        "unit": policy.unit or "requests",
        "rate": policy.rate_text,
        "burst": policy.burst,
        "cost": policy.cost,
        "window": policy.window,
        "failure_mode": policy.failure_mode,
        "per": key,
    }


def budget_object(policy: Policy) -> dict[str, Any]:
    """A policy's token budget as `x-ratelimit` shows it."""
    budget = policy.tokens
    assert budget is not None
    found = policy_object(budget, "user")
    found["cost"] = (
        policy.tokens_estimate
        if policy.tokens_estimate is not None
        else "reserved: about one token per 4 bytes of body, settled against the reported usage"
    )
    return found


def concurrency_object(policy: Policy) -> dict[str, Any]:
    return {
        "policy": policy.concurrent_name,
        "unit": "concurrent-requests",
        "limit": policy.concurrent,
        "failure_mode": policy.failure_mode,
        "per": "user",
    }


def applied_to(policy: Policy, ceilings: list[Policy | None]) -> list[dict[str, Any]]:
    """`policy` (a user policy, or a plan's version of it) and the per-address `ceilings` that
    cost something, in RateLimit-Policy order."""
    applied = []
    if policy.cost:
        applied.append(policy_object(policy, "user"))
    if policy.tokens is not None:
        applied.append(budget_object(policy))
    for ceiling in ceilings:
        if ceiling is not None and ceiling.cost:
            applied.append(policy_object(ceiling, "address"))
    if policy.concurrent is not None:
        applied.append(concurrency_object(policy))
    return applied


def ratelimit_of(policies: Policies, method: str, path: str) -> list[dict[str, Any]]:
    """The policies the limiter applies to `method path`, in RateLimit-Policy order."""
    policy = policies.match(method.upper(), path)
    return applied_to(policy, [policy.address, policies.ip])


def plans_of(policies: Policies, method: str, path: str) -> dict[str, list[dict[str, Any]]]:
    """What each configured plan's users get on `method path` (x-ratelimit-plans; the address
    ceilings are the same for every plan, so they are in x-ratelimit alone)."""
    base = policies.match(method.upper(), path)
    return {plan: applied_to(versions[base.name], []) for plan, versions in policies.plans.items()}


def _describe(limits: list[dict[str, Any]]) -> str:
    if not limits:
        return "Not rate limited."
    parts = []
    for x in limits:
        if x["unit"] == "concurrent-requests":
            parts.append(f"`{x['policy']}` at most {x['limit']} at once per {x['per']}")
        elif x["unit"] == "tokens":
            parts.append(f"`{x['policy']}` {x['rate']} model tokens, burst {x['burst']}, per "
                         f"{x['per']}")  # fmt: skip
        else:
            parts.append(f"`{x['policy']}` {x['rate']}, burst {x['burst']}, {x['cost']} "
                         f"token(s) per call, per {x['per']}")  # fmt: skip
    return "Rate limits: " + "; ".join(parts) + "."


def _annotate(
    operation: dict[str, Any],
    method: str,
    path: str,
    policies: Policies | None,
    *,
    jwt: bool,
    max_body: int,
) -> None:
    """Add what the gateway does to one proxied operation, in place."""
    params = []
    for param in operation.get("parameters", []):
        if param.get("in") == "header" and param.get("name", "").lower() == "x-user-id":
            if jwt:
                continue  # the gateway sets it from the token; a client's value is dropped
            param = {
                **param,
                "required": False,
                "description": f"Who you are (`{USER_ID_PATTERN}`, not starting with "
                f"`{ANONYMOUS_PREFIX}`), believed only as GATEWAY_USER_ID_HEADER allows (from "
                "an authenticating proxy in front, by default); without it, or when it is not "
                "believed, your address is. Rate limits are counted per this identity.",
            }
        params.append(param)
    if params:
        operation["parameters"] = params
    else:
        operation.pop("parameters", None)
    responses = operation.setdefault("responses", {})
    limits = ratelimit_of(policies, method, path) if policies is not None else []
    note = _describe(limits) if policies is not None else "Rate limiting is off."
    plans = plans_of(policies, method, path) if policies is not None else {}
    for plan, applied in plans.items():
        note += f" Plan `{plan}`: " + _describe(applied).removeprefix("Rate limits: ")
    operation["description"] = (operation.get("description", "").rstrip() + "\n\n" + note).strip()
    for code, meaning in (
        ("502", "The gateway could not reach the upstream, or it reset the connection."),
        ("504", "The upstream did not connect or send its first byte in time."),
    ):
        if code in responses and "$ref" not in responses[code]:
            upstream = responses[code].get("description", "")
            responses[code]["description"] = f"{meaning} Or, from the service: {upstream}"
        else:
            responses[code] = _gateway_problem(meaning)
    if "requestBody" in operation:
        responses["413"] = _gateway_problem(f"The body exceeds {max_body} bytes.")
    if policies is not None:
        operation["x-ratelimit"] = limits
        if plans:  # the user policies of each plan (the address ceilings are the same)
            operation["x-ratelimit-plans"] = plans
        for response in responses.values():  # every answer once the limiter has run
            if isinstance(response, dict) and "$ref" not in response:
                response.setdefault("headers", {}).update(
                    {name: {"$ref": f"#/components/headers/{name}"} for name in HEADERS}
                )
        responses["429"] = {"$ref": "#/components/responses/QuotaExceeded"}
    if jwt:
        operation["security"] = [{"bearerAuth": []}, {}]
        responses["401"] = _gateway_problem("The bearer token is invalid or expired.")


def merge(
    upstream: dict[str, Any] | None,
    own: dict[str, Any],
    policies: Policies | None,
    *,
    jwt: bool,
    public_url: str | None,
    max_body: int,
) -> dict[str, Any]:
    """One document: the gateway's operations, the upstream's annotated; the gateway wins a
    path both have (logged)."""
    doc = copy.deepcopy(own)
    doc["servers"] = [{"url": public_url or "/", "description": "the gateway"}]
    paths: dict[str, Any] = doc.setdefault("paths", {})
    components: dict[str, Any] = doc.setdefault("components", {})
    schemas: dict[str, Any] = components.setdefault("schemas", {})
    if upstream is not None:
        theirs = copy.deepcopy(upstream)
        for name, schema in theirs.get("components", {}).get("schemas", {}).items():
            if name in schemas:
                logger.warning(
                    "OpenAPI merge: schema %s on both sides; keeping the gateway's", name
                )
                continue
            schemas[name] = schema
        for path, item in theirs.get("paths", {}).items():
            if path in paths:
                logger.warning("OpenAPI merge: %s on both sides; keeping the gateway's", path)
                continue
            for method, operation in item.items():
                if method in METHODS and isinstance(operation, dict):
                    _annotate(operation, method, path, policies, jwt=jwt, max_body=max_body)
            paths[path] = item
        for tag in theirs.get("tags", []):
            doc.setdefault("tags", []).append(tag)
    schemas.update(GATEWAY_SCHEMAS)
    if policies is not None:
        components.setdefault("headers", {}).update(HEADERS)
        components.setdefault("headers", {})["Retry-After"] = RETRY_AFTER
        components.setdefault("responses", {})["QuotaExceeded"] = {
            "description": "A rate-limit policy has no tokens left; the request never reached "
            "the service.",
            "headers": {
                name: {"$ref": f"#/components/headers/{name}"} for name in ("Retry-After", *HEADERS)
            },
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/QuotaExceeded"}}},
        }
    if jwt:
        components.setdefault("securitySchemes", {})["bearerAuth"] = {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "Optional: the token's `sub` is the user; without a token the "
            "client address is.",
        }
    return doc


class ApiDocument:
    """The last good upstream document and the merged bytes served from it."""

    def __init__(
        self,
        own: dict[str, Any],
        fetch: Callable[[], Awaitable[dict[str, Any]]],
        *,
        jwt: bool,
        public_url: str | None,
        max_body: int,
        refresh: float,
        on_paths: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.own = own
        self.on_paths = on_paths  # told the upstream's path templates on every new copy
        self.fetch = fetch
        self.jwt = jwt
        self.public_url = public_url
        self.max_body = max_body
        self.refresh_seconds = refresh
        self.upstream: dict[str, Any] | None = None
        self._cached: tuple[object, object, bytes] | None = None
        self._task: asyncio.Task[None] | None = None

    def render(self, policies: Policies | None) -> bytes:
        """The merged document as JSON, rebuilt only when its inputs changed."""
        cached = self._cached
        if cached is not None and cached[0] is self.upstream and cached[1] is policies:
            return cached[2]
        doc = merge(self.upstream, self.own, policies, jwt=self.jwt, public_url=self.public_url,
                    max_body=self.max_body)  # fmt: skip
        body = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
        self._cached = (self.upstream, policies, body)
        return body

    async def update(self) -> bool:
        """Fetch the upstream's document once; keep the last good copy on any failure."""
        try:
            doc = await self.fetch()
        except Exception as exc:
            logger.warning("upstream OpenAPI document not fetched (%s); serving the last copy",
                           exc)  # fmt: skip
            return False
        if not isinstance(doc, dict) or not isinstance(doc.get("paths"), dict):
            logger.warning("upstream OpenAPI document has no paths; serving the last copy")
            return False
        if doc != self.upstream:
            self.upstream = doc
            if self.on_paths is not None:
                self.on_paths([path for path in doc["paths"] if isinstance(path, str)])
        return True

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            ok = await self.update()
            wait = self.refresh_seconds if ok or self.upstream is not None else RETRY_WHILE_EMPTY
            await asyncio.sleep(min(wait, self.refresh_seconds))

    async def close(self) -> None:
        await cancel(self._task)
