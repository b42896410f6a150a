"""DNS list sites and queries: postscreen's site syntax, RFC 5782 query names, and lookups
against the loopback test DNS server (listed, unlisted, SERVFAIL, silence)."""

from __future__ import annotations

import ipaddress
import time

import pytest
from tests.support.dns_server import DNSServer

from mailhaven.net.dnslist import (
    ListResolver,
    SiteError,
    client_query,
    domain_query,
    parse_site,
)


def test_site_syntax() -> None:
    site = parse_site("zen.example=127.0.0.[2..11]*3")
    assert site.zone == "zen.example" and site.weight == 3
    assert site.octets is not None and site.octets[3] == frozenset(range(2, 12))
    assert site.matches(ipaddress.IPv4Address("127.0.0.4"))
    assert not site.matches(ipaddress.IPv4Address("127.0.0.12"))
    allow = parse_site("list.dnswl.example=127.0.[0..255].[1;3]*-2")
    assert allow.weight == -2
    assert allow.matches(ipaddress.IPv4Address("127.0.9.3"))
    assert not allow.matches(ipaddress.IPv4Address("127.0.9.2"))
    plain = parse_site("BL.Example.")
    assert plain.zone == "bl.example" and plain.weight == 1 and plain.octets is None


def test_unfiltered_site_ignores_error_answers_and_other_networks() -> None:
    site = parse_site("bl.example")
    assert site.matches(ipaddress.IPv4Address("127.0.0.2"))
    assert not site.matches(ipaddress.IPv4Address("127.255.255.254"))  # "query refused"
    assert not site.matches(ipaddress.IPv4Address("10.0.0.2"))


@pytest.mark.parametrize(
    "spec",
    ["", "nodot", "zen.example=127.0.0", "zen.example=127.0.0.[2..]", "zen.example=127.0.0.300",
     "zen.example*x", "zen.example=127.0.0.[]", "bad zone.example", "a..b.example"],
)  # fmt: skip
def test_bad_sites_are_refused_with_a_reason(spec: str) -> None:
    with pytest.raises(SiteError):
        parse_site(spec)


def test_query_names() -> None:
    assert client_query("192.0.2.99", "zen.example") == "99.2.0.192.zen.example"
    assert client_query("::ffff:192.0.2.99", "zen.example") == "99.2.0.192.zen.example"
    six = client_query("2001:db8::1", "bl.example")
    assert six is not None and six.startswith("1.0.0.0.") and six.endswith(".8.b.d.0.1.0.0.2.bl.example")
    assert client_query("junk", "zen.example") is None
    assert domain_query("Example.ORG.", "dbl.example") == "example.org.dbl.example"
    assert domain_query("", "dbl.example") is None
    assert domain_query("[192.0.2.1]", "dbl.example") is None
    assert domain_query("x" * 250 + ".example", "dbl.example") is None


RECORDS = {
    "2.0.0.127.bl.example": {"A": ["127.0.0.2", "127.0.0.10"]},
    "3.0.0.127.bl.example": {"A": ["10.1.2.3"]},
}


async def test_lookups_against_the_test_server() -> None:
    with DNSServer(RECORDS, servfail={"4.0.0.127.bl.example"},
                   silent={"5.0.0.127.bl.example"}) as dns:  # fmt: skip
        resolver = ListResolver([dns.address], timeout=0.5)
        listed = await resolver.query("2.0.0.127.bl.example")
        assert sorted(listed.addresses) == ["127.0.0.10", "127.0.0.2"] and listed.failed is None
        assert listed.ttl == 300
        odd = await resolver.query("3.0.0.127.bl.example")
        assert odd.addresses == ("10.1.2.3",)  # the scorer ignores it, not the resolver
        clean = await resolver.query("1.0.0.127.bl.example")
        assert clean.addresses == () and clean.failed is None
        broken = await resolver.query("4.0.0.127.bl.example")
        assert broken.failed == "server failure"
        started = time.monotonic()
        silent = await resolver.query("5.0.0.127.bl.example")
        assert silent.failed == "timeout"
        assert time.monotonic() - started < 2.0
