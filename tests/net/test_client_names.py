"""Client names (FCrDNS) against the loopback test DNS server: never real DNS."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from tests.support.dns_server import DNSServer, Records, dns_server

from mailhaven.net.client_names import (
    FAILURE_TTL,
    UNKNOWN,
    ClientName,
    ClientNames,
    valid_hostname,
)
from mailhaven.net.dns import PTRNames, Resolver

__all__ = ["dns_server"]  # the fixture, imported for pytest

Factory = Callable[..., DNSServer]

ZONE: Records = {
    "1.0.0.127.in-addr.arpa": {"PTR": ["LocalHost."]},
    "localhost": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
    "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa": {
        "PTR": ["localhost"]
    },
    # claims a name whose address is another one
    "2.0.0.127.in-addr.arpa": {"PTR": ["elsewhere.test"]},
    "elsewhere.test": {"A": ["192.0.2.1"]},
    # the second of two names confirms
    "3.0.0.127.in-addr.arpa": {"PTR": ["nowhere.test", "three.test"]},
    "three.test": {"A": ["127.0.0.3"]},
    "4.0.0.127.in-addr.arpa": {"PTR": ["127.0.0.4"]},
    "5.0.0.127.in-addr.arpa": {"PTR": ["bad\\032name.test"]},
    "7.0.0.127.in-addr.arpa": {"PTR": ["flaky.test"]},
}


def names(server: DNSServer, timeout: float = 2.0, **kwargs: object) -> ClientNames:
    resolver = Resolver(nameservers=[server.address], timeout=timeout)
    return ClientNames(resolver, timeout, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def server(dns_server: Factory) -> DNSServer:
    return dns_server(
        ZONE,
        servfail={"6.0.0.127.in-addr.arpa", "flaky.test"},
        silent={"8.0.0.127.in-addr.arpa"},
    )


async def test_ptr_lookup(server: DNSServer) -> None:
    resolver = Resolver(nameservers=[server.address], timeout=2.0)
    assert await resolver.resolve_ptr("127.0.0.1") == PTRNames(("localhost",), 300)
    assert server.queries == [("1.0.0.127.in-addr.arpa", "PTR", "udp")]


async def test_confirmed_name(server: DNSServer) -> None:
    assert await names(server).lookup("127.0.0.1") == ClientName("localhost")
    assert ("localhost", "A", "udp") in server.queries


async def test_confirmed_ipv6_and_ipv4_mapped(server: DNSServer) -> None:
    lookup = names(server)
    assert await lookup.lookup("::1") == ClientName("localhost")
    assert await lookup.lookup("::ffff:127.0.0.1") == ClientName("localhost")


async def test_name_that_resolves_elsewhere_is_unknown_with_warning(server: DNSServer) -> None:
    found = await names(server).lookup("127.0.0.2")
    assert found == ClientName(
        "unknown", "hostname elsewhere.test does not resolve to address 127.0.0.2"
    )


async def test_any_confirmed_name_of_several(server: DNSServer) -> None:
    assert await names(server).lookup("127.0.0.3") == ClientName("three.test")


async def test_no_ptr_is_unknown_without_warning(server: DNSServer) -> None:
    assert await names(server).lookup("127.0.0.9") == UNKNOWN


async def test_numeric_and_malformed_names_are_never_resolved(server: DNSServer) -> None:
    lookup = names(server)
    assert await lookup.lookup("127.0.0.4") == ClientName("unknown", "numeric hostname: 127.0.0.4")
    found = await lookup.lookup("127.0.0.5")
    assert found.name == "unknown" and found.warning is not None
    assert found.warning.startswith("malformed hostname: ")
    assert {q[1] for q in server.queries} == {"PTR"}


async def test_servfail_is_unknown(server: DNSServer) -> None:
    assert await names(server).lookup("127.0.0.6") == UNKNOWN
    found = await names(server).lookup("127.0.0.7")  # the forward lookup fails
    assert found == ClientName(
        "unknown", "hostname flaky.test does not resolve to address 127.0.0.7: temporary failure"
    )


async def test_silent_server_is_unknown_within_the_timeout(server: DNSServer) -> None:
    assert await names(server, timeout=0.3).lookup("127.0.0.8") == UNKNOWN


async def test_answers_are_cached_for_their_ttl() -> None:
    now = [0.0]
    with DNSServer(ZONE) as server:
        lookup = names(server, clock=lambda: now[0])
        assert await lookup.lookup("127.0.0.1") == ClientName("localhost")
        asked = len(server.queries)
        now[0] = 299.0
        assert await lookup.lookup("127.0.0.1") == ClientName("localhost")
        assert len(server.queries) == asked
        now[0] = 301.0  # the test server's TTL is 300
        assert await lookup.lookup("127.0.0.1") == ClientName("localhost")
        assert len(server.queries) == 2 * asked


async def test_failures_are_cached_briefly() -> None:
    now = [0.0]
    with DNSServer(ZONE, servfail={"6.0.0.127.in-addr.arpa"}) as server:
        lookup = names(server, clock=lambda: now[0])
        assert await lookup.lookup("127.0.0.6") == UNKNOWN
        assert await lookup.lookup("127.0.0.6") == UNKNOWN
        asked = len(server.queries)
        now[0] = FAILURE_TTL + 1
        assert await lookup.lookup("127.0.0.6") == UNKNOWN
        assert len(server.queries) > asked


async def test_cache_is_bounded(server: DNSServer) -> None:
    lookup = names(server, cache_size=2)
    for ip in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
        await lookup.lookup(ip)
    asked = len(server.queries)
    await lookup.lookup("127.0.0.3")  # still cached
    assert len(server.queries) == asked
    await lookup.lookup("127.0.0.1")  # the oldest went out
    assert len(server.queries) > asked


async def test_concurrent_sessions_share_one_lookup(server: DNSServer) -> None:
    lookup = names(server)
    found = await asyncio.gather(*(lookup.lookup("127.0.0.1") for _ in range(20)))
    assert set(found) == {ClientName("localhost")}
    assert server.queries.count(("1.0.0.127.in-addr.arpa", "PTR", "udp")) == 1


async def test_a_cancelled_waiter_does_not_cancel_the_others(server: DNSServer) -> None:
    lookup = names(server)
    first = asyncio.ensure_future(lookup.lookup("127.0.0.1"))
    second = asyncio.ensure_future(lookup.lookup("127.0.0.1"))
    await asyncio.sleep(0)
    first.cancel()
    assert await second == ClientName("localhost")


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("mail.example.com", True),
        ("a-b_c.example", True),
        ("localhost", True),
        ("127.0.0.1", False),
        ("1.2.3.4.5", False),
        ("-bad.example", False),
        ("bad-.example", False),
        ("sp ace.example", False),
        ("x" * 64 + ".example", False),
        ("a..b", False),
        ("", False),
    ],
)
def test_valid_hostname(name: str, ok: bool) -> None:
    assert valid_hostname(name) is ok
