"""The DNS facade against the loopback test server: never real DNS."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from tests.support.dns_server import DNSServer, Records, dns_server

from mailhaven.net.dns import (
    LookupFailed,
    MXHost,
    MXHosts,
    NullMX,
    Resolver,
    Target,
    parse_literal,
    plan_targets,
    sort_mx,
)

__all__ = ["dns_server"]  # the fixture, imported for pytest

Factory = Callable[..., DNSServer]

ZONE: Records = {
    "example.test": {
        "MX": [(20, "mx2.example.test"), (10, "mx1.example.test"), (30, "gone.example.test")]
    },
    "mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
    "mx2.example.test": {"A": ["127.0.0.3", "127.0.0.4"]},
    "noaddr.example.test": {"TXT": ["v=spf1 -all"]},
    "implicit.test": {"A": ["127.0.0.5"]},
    "v6only.test": {"AAAA": ["2001:db8::25"]},
    "nullmx.test": {"MX": [(0, ".")]},
    "equal.test": {"MX": [(10, f"mx{i}.equal.test") for i in range(5)] + [(5, "first.equal.test")]},
    "alias.test": {"CNAME": ["mx1.example.test"]},
    "big.test": {"AAAA": [f"2001:db8::{i:x}" for i in range(80)]},
    "loop.test": {"MX": [(10, "other.test"), (20, "me.test"), (30, "backup.test")]},
    "broken-mx.test": {"MX": [(10, "broken.test")]},
}


def resolver(server: DNSServer, **kwargs: object) -> Resolver:
    return Resolver(nameservers=[server.address], timeout=2.0, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def server(dns_server: Factory) -> DNSServer:
    return dns_server(ZONE, servfail={"broken.test"}, silent={"slow.test"})


async def test_mx_sorted_by_preference(server: DNSServer) -> None:
    result = await resolver(server).resolve_mx("Example.Test.")
    assert result == MXHosts(
        (
            MXHost(10, "mx1.example.test"),
            MXHost(20, "mx2.example.test"),
            MXHost(30, "gone.example.test"),
        )
    )
    assert server.queries == [("example.test", "MX", "udp")]


async def test_equal_preferences_are_shuffled(server: DNSServer) -> None:
    orders = set()
    for seed in range(30):
        result = await resolver(server, rng=random.Random(seed)).resolve_mx("equal.test")
        assert isinstance(result, MXHosts)
        assert result.hosts[0] == MXHost(5, "first.equal.test")
        assert {h.preference for h in result.hosts[1:]} == {10}
        orders.add(tuple(h.host for h in result.hosts))
    assert len(orders) > 5


async def test_implicit_mx(server: DNSServer) -> None:
    r = resolver(server)
    assert await r.resolve_mx("implicit.test") == MXHosts((MXHost(0, "implicit.test"),), True)
    assert await r.resolve_targets("implicit.test") == [Target("implicit.test", 0, ("127.0.0.5",))]


async def test_implicit_mx_without_addresses_is_permanent(server: DNSServer) -> None:
    result = await resolver(server).resolve_targets("noaddr.example.test")
    assert isinstance(result, LookupFailed) and result.permanent


async def test_null_mx(server: DNSServer) -> None:
    result = await resolver(server).resolve_mx("nullmx.test")
    assert result == NullMX("nullmx.test")
    assert (result.reply.code, result.reply.enhanced) == (556, "5.1.10")
    assert await resolver(server).resolve_targets("nullmx.test") == result


async def test_nxdomain_is_permanent(server: DNSServer) -> None:
    result = await resolver(server).resolve_mx("nowhere.test")
    assert isinstance(result, LookupFailed) and result.permanent
    assert result.reply.enhanced == "5.4.4" and "name=nowhere.test type=MX" in result.reply.text


async def test_servfail_is_temporary(server: DNSServer) -> None:
    result = await resolver(server).resolve_mx("broken.test")
    assert isinstance(result, LookupFailed) and not result.permanent
    assert result.reply.enhanced == "4.4.3"


async def test_timeout_is_temporary(dns_server: Factory) -> None:
    server = dns_server(ZONE, silent={"slow.test"})
    r = Resolver(nameservers=[server.address], timeout=0.3)
    result = await r.resolve_mx("slow.test")
    assert isinstance(result, LookupFailed) and not result.permanent
    assert result.reply.text == (  # Postfix's words (issue 16 #5)
        "Host or domain name not found. Name service error for name=slow.test type=MX:"
        " Host not found, try again"
    )


async def test_addresses_ipv6_and_ipv4(server: DNSServer) -> None:
    r = resolver(server)
    assert await r.resolve_addresses("mx1.example.test") == ["::1", "127.0.0.2"]
    assert await r.resolve_addresses("v6only.test") == ["2001:db8::25"]
    assert await r.resolve_addresses("alias.test") == ["::1", "127.0.0.2"]
    assert await r.resolve_addresses("noaddr.example.test") == []
    assert await resolver(server, families="ipv4").resolve_addresses("mx1.example.test") == [
        "127.0.0.2"
    ]
    missing = await r.resolve_addresses("gone.example.test")
    assert isinstance(missing, LookupFailed) and missing.permanent


async def test_large_answer_falls_back_to_tcp(server: DNSServer) -> None:
    found = await resolver(server).resolve_addresses("big.test")
    assert isinstance(found, list) and len(found) == 80
    assert ("big.test", "AAAA", "tcp") in server.queries


async def test_targets_skip_hosts_without_addresses(server: DNSServer) -> None:
    result = await resolver(server).resolve_targets("example.test", max_hosts=5)
    assert isinstance(result, list)
    assert result[0] == Target("mx1.example.test", 10, ("::1", "127.0.0.2"))  # IPv6 first
    assert [(t.host, t.preference) for t in result[1:]] == [("mx2.example.test", 20)]
    assert sorted(result[1].addresses) == ["127.0.0.3", "127.0.0.4"]  # an RRset has no order
    limited = await resolver(server).resolve_targets("example.test", max_hosts=1)
    assert isinstance(limited, list) and [t.host for t in limited] == ["mx1.example.test"]


async def test_targets_temporary_when_the_mx_host_fails(server: DNSServer) -> None:
    result = await resolver(server).resolve_targets("broken-mx.test")
    assert isinstance(result, LookupFailed) and not result.permanent


@pytest.mark.parametrize(
    ("literal", "address"),
    [("[127.0.0.1]", "127.0.0.1"), ("[IPv6:::1]", "::1"), ("[ipv6:2001:DB8::1]", "2001:db8::1")],
)
async def test_domain_literals_skip_dns(server: DNSServer, literal: str, address: str) -> None:
    r = resolver(server)
    assert await r.resolve_targets(literal) == [Target(literal.lower(), 0, (address,))]
    assert server.queries == []


@pytest.mark.parametrize("bad", ["[::1]", "[300.1.1.1]", "[example.test]"])
async def test_bad_domain_literals(server: DNSServer, bad: str) -> None:
    assert parse_literal(bad) is None
    result = await resolver(server).resolve_mx(bad)
    assert isinstance(result, LookupFailed) and result.permanent


async def test_bad_names_are_permanent(server: DNSServer) -> None:
    result = await resolver(server).resolve_mx("a" * 64 + ".test")
    assert isinstance(result, LookupFailed) and result.permanent


def test_plan_targets_loop_prevention() -> None:
    mx = MXHosts((MXHost(10, "other.test"), MXHost(20, "me.test"), MXHost(30, "backup.test")))
    addrs = {"other.test": ["192.0.2.1"], "me.test": ["192.0.2.2"], "backup.test": ["192.0.2.3"]}
    assert plan_targets(mx, addrs, self_names={"ME.test"}) == [
        Target("other.test", 10, ("192.0.2.1",))
    ]
    alone = plan_targets(MXHosts((MXHost(10, "me.test"),)), addrs, self_names={"me.test"})
    assert isinstance(alone, LookupFailed) and alone.reply.enhanced == "5.4.6"


def test_sort_mx_is_stable_by_preference() -> None:
    records = [MXHost(20, "b"), MXHost(10, "a"), MXHost(20, "c")]
    for seed in range(10):
        ordered = sort_mx(records, random.Random(seed))
        assert [r.preference for r in ordered] == [10, 20, 20]


def test_server_answers_ipv6_loopback() -> None:
    try:
        server = DNSServer(ZONE, host="::1").start()
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        assert server.address[0] == "::1"
    finally:
        server.stop()
