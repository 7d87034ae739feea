"""pixelcraft.problems.render: the RFC 9457 body both services answer errors with."""

from __future__ import annotations

import json

from pixelcraft.problems import render


def test_members_in_order_request_id_last() -> None:
    body = json.loads(render(400, "Bad Request", "field x is bad", "rid-1", {"field": "x"}))
    assert list(body.items()) == [
        ("type", "about:blank"),
        ("title", "Bad Request"),
        ("status", 400),
        ("detail", "field x is bad"),
        ("field", "x"),
        ("request_id", "rid-1"),
    ]


def test_a_type_of_its_own() -> None:
    kind = "https://iana.org/assignments/http-problem-types#quota-exceeded"
    body = json.loads(render(429, "Too Many Requests", "slow down", "r", None, kind))
    assert body["type"] == kind and "field" not in body


def test_a_member_cannot_replace_the_request_id_or_break_the_json() -> None:
    raw = render(500, "Oops", 'quote " and \n newline', "real", {"request_id": "forged"})
    body = json.loads(raw)
    assert body["request_id"] == "real"
    assert body["detail"] == 'quote " and \n newline'
    assert b"\n" not in raw
