"""The one RFC 9457 problem renderer, for both services' error answers.

Every error either service answers is `application/problem+json`: `type`, `title`, `status`,
`detail`, then members of the error's own (`field`, `header`, `policies`, ...), and last the
`request_id` a client quotes to an operator. The headers an error carries (Allow, Retry-After,
WWW-Authenticate) are the caller's to send with it: the body never replaces them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

PROBLEM_JSON = "application/problem+json"


def problem(
    status: int,
    title: str,
    detail: str,
    request_id: str,
    members: Mapping[str, Any] | None = None,
    type_: str = "about:blank",
) -> dict[str, Any]:
    """The problem object; `request_id` comes last so a renderer may cut the body there."""
    body: dict[str, Any] = {"type": type_, "title": title, "status": status, "detail": detail}
    if members:
        body.update(members)
    body["request_id"] = request_id
    return body


def render(
    status: int,
    title: str,
    detail: str,
    request_id: str,
    members: Mapping[str, Any] | None = None,
    type_: str = "about:blank",
) -> bytes:
    """The problem document as bytes."""
    return json.dumps(problem(status, title, detail, request_id, members, type_)).encode()
