"""client_of: the client address, X-Forwarded-For believed only through trusted proxies."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.auth.identity import Client, client_of
from pixelcraft.fields import IPNetwork

PROXIES: list[IPNetwork] = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]


def test_without_trusted_proxies_the_peer_is_the_client() -> None:
    assert client_of("10.0.0.1", ["203.0.113.7"], []) == Client("10.0.0.1", False)


def test_an_untrusted_peer_cannot_name_another_client() -> None:
    assert client_of("198.51.100.9", ["203.0.113.7"], PROXIES) == Client("198.51.100.9", False)
    # an IPv4-mapped IPv6 peer is its IPv4 address, trusted or not
    assert client_of("::ffff:198.51.100.9", [], PROXIES) == Client("198.51.100.9", False)
    assert client_of("::ffff:10.0.0.1", ["203.0.113.7"], PROXIES) == Client("203.0.113.7", True)


@pytest.mark.parametrize(
    ("forwarded", "client"),
    [
        (["203.0.113.7"], "203.0.113.7"),
        # the rightmost address no trusted hop vouches for; what the client wrote on the left
        # (1.1.1.1) is not believed
        (["1.1.1.1, 203.0.113.7, 10.0.0.2"], "203.0.113.7"),
        (["1.1.1.1", "203.0.113.7, 10.0.0.3"], "203.0.113.7"),  # several header lines: one chain
        (["10.0.0.5, 10.0.0.2"], "10.0.0.5"),  # every hop trusted: the leftmost
        (["203.0.113.7:5555"], "203.0.113.7"),  # IPv4 with a port
        (["garbage, 10.0.0.2"], "10.0.0.2"),  # garbage left of the last trusted hop
        (["203.0.113.7, garbage"], "10.0.0.1"),  # the peer saw garbage: the peer is what we know
        ([], "10.0.0.1"),
    ],
)
def test_forwarded_for_through_a_trusted_peer(forwarded: list[str], client: str) -> None:
    assert client_of("10.0.0.1", forwarded, PROXIES) == Client(client, True)


@pytest.mark.parametrize(
    ("forwarded", "client"),
    [
        (["2001:db8::1"], "2001:db8::1"),
        (["[2001:db8::1]:1234"], "2001:db8::1"),  # bracketed, with a port
        (["2001:db8::1, fd00::2"], "2001:db8::1"),
        (["2001:0db8:0000::0001"], "2001:db8::1"),  # written out: the canonical form
    ],
)
def test_ipv6(forwarded: list[str], client: str) -> None:
    assert client_of("fd00::1", forwarded, PROXIES) == Client(client, True)
    assert client_of("[fd00::1]:443", forwarded, PROXIES) == Client(client, True)
