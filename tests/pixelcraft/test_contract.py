"""pixelcraft.contract: the X-User-Id check both services apply."""

from __future__ import annotations

import pytest

from pixelcraft.contract import USER_ID_PATTERN, anonymous, reserved, user_id_fault


@pytest.mark.parametrize(
    "values", [[], ["alice"], ["user-123"], ["a.b_c:d@e-f"], ["x" * 128], ["ip:10.0.0.1"]]
)
def test_well_formed_or_absent(values: list[str]) -> None:
    assert user_id_fault(values) is None


@pytest.mark.parametrize("value", ["", "has space", "x" * 129, "tab\there", "é", "a/b", "a;b"])
def test_malformed(value: str) -> None:
    assert user_id_fault([value]) == f"must match {USER_ID_PATTERN}"


def test_more_than_once_even_when_each_is_well_formed() -> None:
    assert user_id_fault(["alice", "alice"]) == "sent more than once"


def test_the_anonymous_namespace() -> None:
    assert anonymous("203.0.113.7") == "ip:203.0.113.7"
    assert reserved(anonymous("::1")) and reserved("IP:x") and reserved("Ip:")
    assert not reserved("ipx") and not reserved("alice")
