"""What the gateway and the chat service must agree on: ids, header names, a namespace.

The gateway tells the chat service who is asking in X-User-Id: a verified token's `sub`, an
X-User-Id it believes (see the gateway's GATEWAY_USER_ID_HEADER), or, for a client with neither,
`ip:<address>`. That namespace is the anonymous clients' alone: no header and no token may name
an id in it (the gateway refuses them, 400 and 401), so nobody can read an anonymous client's
conversations by claiming its address. The chat service keeps conversations per forwarded id.
Every request carries an X-Request-Id (the client's when well formed, else the gateway's own),
which both services log and echo, and put in every problem body.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

USER_ID_HEADER = "X-User-Id"
USER_PLAN_HEADER = "X-User-Plan"  # the user's plan, from a proxy the gateway trusts
REQUEST_ID_HEADER = "X-Request-Id"

USER_ID_PATTERN = r"^[A-Za-z0-9._:@-]{1,128}$"
USER_ID = re.compile(USER_ID_PATTERN)
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
ANONYMOUS_PREFIX = "ip:"


def anonymous(address: str) -> str:
    """The id the gateway forwards for a client known only by its address."""
    return f"{ANONYMOUS_PREFIX}{address}"


def reserved(user_id: str) -> bool:
    """Whether a client-chosen id would fall in the anonymous namespace (any case)."""
    return user_id[: len(ANONYMOUS_PREFIX)].lower() == ANONYMOUS_PREFIX


def user_id_fault(values: Sequence[str]) -> str | None:
    """What is wrong with the X-User-Id values of one request (None: one, well formed).
    An absent header is the caller's to judge: the gateway then falls back, the chat service
    refuses."""
    if len(values) > 1:
        return "sent more than once"
    if values and not USER_ID.match(values[0]):
        return f"must match {USER_ID_PATTERN}"
    return None
