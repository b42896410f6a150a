"""One rule for a client's address: IPv4-mapped IPv6 is IPv4, a zone is dropped."""

from __future__ import annotations

import ipaddress

from mailhaven.net.ipaddr import client_ip


def test_mapped_ipv6_is_the_ipv4_address_and_a_zone_is_dropped() -> None:
    assert client_ip("::ffff:192.0.2.1") == ipaddress.IPv4Address("192.0.2.1")
    assert client_ip("fe80::1%eth0") == ipaddress.IPv6Address("fe80::1")
    assert client_ip("2001:db8::1") == ipaddress.IPv6Address("2001:db8::1")
    assert client_ip("192.0.2.7") == ipaddress.IPv4Address("192.0.2.7")


def test_what_is_not_an_address_is_none() -> None:
    for text in ("", "unknown", "192.0.2.256", "[192.0.2.1]", "::ffff:zz"):
        assert client_ip(text) is None
