"""address_key: the key the [ip] ceiling counts an address under."""

from __future__ import annotations

import pytest

from gateway.limiting.limiter import address_key


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),  # IPv4: the address itself
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),  # IPv6: one subscriber's /64
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("::1", "::/64"),
        ("garbage", "garbage"),  # not an address: unchanged
        ("gar:bage", "gar:bage"),
    ],
)
def test_address_key(address: str, key: str) -> None:
    assert address_key(address) == key


def test_rotating_through_a_64_is_one_key_the_next_64_another() -> None:
    keys = {address_key(f"2001:db8:0:7::{n:x}") for n in range(1, 50)}
    assert keys == {"2001:db8:0:7::/64"}
    assert address_key("2001:db8:0:8::1") != address_key("2001:db8:0:7::1")
