"""Who a user is, as both services spell it: the X-User-Id syntax and the anonymous namespace.

The gateway tells the chat service who is asking in X-User-Id: a verified token's `sub`, an
X-User-Id it believes (see the gateway's GATEWAY_USER_ID_HEADER), or, for a client with neither,
`ip:<address>`. That namespace is the anonymous clients' alone: no header and no token may name
an id in it (the gateway refuses them, 400 and 401), so nobody can read an anonymous client's
conversations by claiming its address. The chat service keeps conversations per forwarded id;
both services read the rules here.
"""

from __future__ import annotations

import re

USER_ID_PATTERN = r"^[A-Za-z0-9._:@-]{1,128}$"
USER_ID = re.compile(USER_ID_PATTERN)
ANONYMOUS_PREFIX = "ip:"


def anonymous(address: str) -> str:
    """The id the gateway forwards for a client known only by its address."""
    return f"{ANONYMOUS_PREFIX}{address}"


def reserved(user_id: str) -> bool:
    """Whether a client-chosen id would fall in the anonymous namespace (any case)."""
    return user_id[: len(ANONYMOUS_PREFIX)].lower() == ANONYMOUS_PREFIX
