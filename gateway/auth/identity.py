"""Who is asking: the client's address and the identity limits are keyed on.

The client address is the socket peer, unless that peer is a trusted proxy: then
`X-Forwarded-For` is walked right to left over trusted hops and the first untrusted address is
the client (the rightmost address nobody we trust vouches for). Identity is, first that applies:
a verified JWT's `sub` (JWT mode), a well-formed `X-User-Id` where GATEWAY_USER_ID_HEADER lets
it be believed (the data plane decides that), the client address. A named user also has a
plan: the JWT claim GATEWAY_PLAN_CLAIM, or X-User-Plan believed as X-User-Id is; else
`default`. (Whether the plan is configured is the limiter's to judge.)
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from gateway.auth.tokens import InvalidToken, TokenVerifier, bearer_token
from gateway.errors import BadHeader, Unauthorized
from gateway.limiting.policies import DEFAULT_PLAN, NAME
from pixelcraft.contract import (
    ANONYMOUS_PREFIX,
    USER_ID_HEADER,
    USER_PLAN_HEADER,
    reserved,
    user_id_fault,
)
from pixelcraft.fields import IPAddress, IPNetwork

Kind = Literal["jwt", "header", "ip"]


@dataclass(frozen=True, slots=True)
class Identity:
    """The key limits are counted under; `kind` is safe to log, `value` is not."""

    kind: Kind
    value: str
    plan: str = DEFAULT_PLAN


def _parse(text: str) -> IPAddress | None:
    """An address from a socket peer or an X-Forwarded-For entry (`[v6]:port`, `v4:port`)."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")]
    elif text.count(":") == 1:  # IPv4 with a port
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _trusted(address: IPAddress, trusted: Sequence[IPNetwork]) -> bool:
    return any(address in network for network in trusted)


def trusted_peer(peer: str, trusted: Sequence[IPNetwork]) -> bool:
    """Whether a socket peer is one of GATEWAY_TRUSTED_PROXIES."""
    address = _parse(peer)
    return address is not None and _trusted(address, trusted)


@dataclass(frozen=True, slots=True)
class Client:
    """Where a request comes from: the resolved client address, and whether the socket peer is
    a trusted proxy (whose X-Forwarded-* headers may then be passed on)."""

    address: str
    peer_trusted: bool


def client_of(peer: str, forwarded_for: Sequence[str], trusted: Sequence[IPNetwork]) -> Client:
    """The client, honouring X-Forwarded-For only through trusted proxies."""
    if not trusted:
        return Client(peer, False)
    current = _parse(peer)
    if current is None or not _trusted(current, trusted):
        return Client(str(current) if current is not None else peer, False)
    hops = [hop for value in forwarded_for for hop in value.split(",")]
    for hop in reversed(hops):
        address = _parse(hop)
        if address is None:
            break  # garbage from the client side of the chain: the last trusted hop saw it
        current = address
        if not _trusted(address, trusted):
            break
    return Client(str(current), True)


def header_user(values: Sequence[str]) -> str | None:
    """A well-formed, single X-User-Id, None when absent; BadHeader otherwise."""
    if not values:
        return None
    fault = user_id_fault(values)
    if fault is not None:
        raise BadHeader(USER_ID_HEADER, fault)
    if reserved(values[0]):
        raise BadHeader(
            USER_ID_HEADER, f'"{ANONYMOUS_PREFIX}" ids are anonymous clients\' own; choose another'
        )
    return values[0]


def header_plan(values: Sequence[str]) -> str:
    """A well-formed, single X-User-Plan, `default` when absent; BadHeader otherwise."""
    if not values:
        return DEFAULT_PLAN
    if len(values) > 1:
        raise BadHeader(USER_PLAN_HEADER, "sent more than once")
    if not NAME.match(values[0]):
        raise BadHeader(USER_PLAN_HEADER, f"must match {NAME.pattern}")
    return values[0]


def resolve_plain(user_ids: Sequence[str], client: str, user_plans: Sequence[str] = ()) -> Identity:
    """A believed X-User-Id when well formed (with its X-User-Plan), else the client address
    (whose plan is always the default: an anonymous client has none)."""
    user = header_user(user_ids)
    if user is not None:
        return Identity("header", user, header_plan(user_plans))
    return Identity("ip", client)


def claimed_plan(claims: Mapping[str, Any], path: Sequence[str]) -> str:
    """The plan a token's claims name at `path` (GATEWAY_PLAN_CLAIM split on dots, e.g.
    `app_metadata.plan`); `default` when absent or not a string."""
    found: Any = claims
    for part in path:
        if not isinstance(found, Mapping) or part not in found:
            return DEFAULT_PLAN
        found = found[part]
    return found if isinstance(found, str) and found else DEFAULT_PLAN


async def resolve_jwt(
    authorization: Sequence[str],
    client: str,
    verifier: TokenVerifier,
    plan_claim: Sequence[str] = ("plan",),
) -> Identity:
    """JWT mode: a verified bearer token's `sub` (and its plan claim), else the client
    address."""
    if len(authorization) > 1:
        raise BadHeader("Authorization", "sent more than once")
    try:
        token = bearer_token(authorization[0] if authorization else None)
        if token is not None:
            claims = await verifier.verify(token)
            return Identity("jwt", claims.sub, claimed_plan(claims.claims, plan_claim))
    except InvalidToken as exc:
        raise Unauthorized(exc.reason) from exc
    return Identity("ip", client)
