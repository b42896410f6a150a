"""checks.spf: the RFC 7208 test suite, the processing limits and hostile records."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from tests.checks.spf_suite import SUITE, SuiteZone, load_suite

from mailhaven.checks import spf
from mailhaven.net.dns import DNSAnswer, DNSError, NoRecords, Records

CASES = list(load_suite()) if SUITE.exists() else []


@pytest.mark.skipif(not CASES, reason=f"{SUITE} (Debian python3-spf) is not installed")
@pytest.mark.parametrize(
    ("section", "name", "case", "zone"), CASES, ids=[f"{c[0]}/{c[1]}" for c in CASES]
)
async def test_rfc7208_suite(
    section: str, name: str, case: dict[str, Any], zone: dict[str, list[Any]]
) -> None:
    dns = SuiteZone(zone)
    if case.get("mailfrom"):
        got = await spf.check_mailfrom(dns, case["host"], case["mailfrom"], case.get("helo", ""))
    else:
        got = await spf.check_helo(dns, case["host"], case.get("helo", ""))
    expected = case["result"] if isinstance(case["result"], list) else [case["result"]]
    assert got.result in expected, got
    explanation = case.get("explanation")
    if explanation and explanation != "DEFAULT" and got.result == "fail":
        # the suite's driver keeps the client address's case in %{i}; DNS ignores case
        assert got.explanation.lower() == explanation.lower()


class Zone:
    """A dict zone: {name: {"TXT": [...], "A": [...]}}; names in `slow` never answer."""

    def __init__(self, records: dict[str, dict[str, list[str]]], *,
                 fail: set[str] = frozenset(), slow: set[str] = frozenset()) -> None:  # type: ignore[assignment]  # fmt: skip
        self.records = records
        self.fail = fail
        self.slow = slow
        self.count = 0

    async def lookup(self, name: str, rdtype: str) -> DNSAnswer:
        self.count += 1
        if name in self.slow:
            await asyncio.sleep(3600)
        if name in self.fail:
            return DNSError("server failure")
        if name not in self.records:
            return NoRecords(True)
        values = self.records[name].get(rdtype, [])
        return Records(tuple(values), 300) if values else NoRecords(False)


async def check(zone: Zone, ip: str = "192.0.2.1", sender: str = "a@example.test") -> spf.SPFResult:
    return await spf.check_mailfrom(zone, ip, sender, "helo.example.test")


async def test_twenty_includes_stop_at_the_lookup_limit() -> None:
    records = {"example.test": {"TXT": [
        "v=spf1 " + " ".join(f"include:i{n}.example.test" for n in range(20)) + " -all"
    ]}}
    for n in range(20):
        records[f"i{n}.example.test"] = {"TXT": ["v=spf1 -all"]}
    zone = Zone(records)
    got = await check(zone)
    assert got.result == "permerror" and "too many DNS lookups" in got.reason
    assert zone.count <= spf.MAX_DNS_MECHANISMS + 2


async def test_an_include_loop_is_a_permerror() -> None:
    zone = Zone({"example.test": {"TXT": ["v=spf1 include:example.test -all"]}})
    got = await check(zone)
    assert got.result == "permerror"
    assert zone.count <= spf.MAX_DNS_MECHANISMS + 2


async def test_a_redirect_loop_is_a_permerror() -> None:
    zone = Zone({"example.test": {"TXT": ["v=spf1 redirect=other.test"]},
                 "other.test": {"TXT": ["v=spf1 redirect=example.test"]}})  # fmt: skip
    assert (await check(zone)).result == "permerror"


async def test_void_lookups_past_two_are_a_permerror() -> None:
    zone = Zone({"example.test": {"TXT": [
        "v=spf1 a:n1.example.test a:n2.example.test a:n3.example.test -all"
    ]}})
    got = await check(zone)
    assert got.result == "permerror" and "void" in got.reason


async def test_servfail_is_a_temperror() -> None:
    zone = Zone({}, fail={"example.test"})
    assert (await check(zone)).result == "temperror"
    zone = Zone({"example.test": {"TXT": ["v=spf1 include:broken.test -all"]}},
                fail={"broken.test"})  # fmt: skip
    assert (await check(zone)).result == "temperror"


async def test_no_record_and_no_domain_are_none() -> None:
    assert (await check(Zone({}))).result == "none"
    assert (await check(Zone({"example.test": {"TXT": ["hello"]}}))).result == "none"
    assert (await spf.check_helo(Zone({}), "192.0.2.1", "[192.0.2.1]")).result == "none"


@pytest.mark.parametrize("record", [
    "v=spf1 ip4:192.0.2.1/33 -all", "v=spf1 ip4:300.1.1.1 -all", "v=spf1 ip6:zz::1 -all",
    "v=spf1 a:%{x}.example.test -all", "v=spf1 foo -all", "v=spf1 -all redirect=a redirect=b",
    "v=spf1 a/0a -all", "v=spf1 include: -all", "v=spf1 exists:%{d0}.example.test -all",
    "v=spf1 a:\x00.example.test", "v=spf1 mx:example.1 -all",
])  # fmt: skip
async def test_syntax_errors_are_a_permerror(record: str) -> None:
    got = await check(Zone({"example.test": {"TXT": [record]}}))
    assert got.result == "permerror", got


async def test_macros_expand_as_rfc7208_section_7_4_shows() -> None:
    """RFC 7208 §7.4's examples, for sender strong-bad@email.example.com from 192.0.2.3."""
    evaluation = spf._Evaluation(
        Zone({}), spf._ip("192.0.2.3"), "strong-bad@email.example.com", "mx.example.org", ""
    )
    d = "email.example.com"
    assert evaluation.expand("%{s}", d) == "strong-bad@email.example.com"
    assert evaluation.expand("%{o}", d) == "email.example.com"
    assert evaluation.expand("%{d4}", d) == "email.example.com"
    assert evaluation.expand("%{d2}", d) == "example.com"
    assert evaluation.expand("%{dr}", d) == "com.example.email"
    assert evaluation.expand("%{d2r}", d) == "example.email"
    assert evaluation.expand("%{l-}", d) == "strong.bad"
    assert evaluation.expand("%{lr-}", d) == "bad.strong"
    assert evaluation.expand("%{l1r-}", d) == "strong"
    assert evaluation.expand("%{ir}.%{v}._spf.%{d2}", d) == "3.2.0.192.in-addr._spf.example.com"
    assert evaluation.expand("%{lr-}.lp._spf.%{d2}", d) == "bad.strong.lp._spf.example.com"
    six = spf._Evaluation(Zone({}), spf._ip("2001:db8::cb01"), "a@b.example", "", "")
    assert six.expand("%{ir}.%{v}._spf.%{d2}", "email.example.com") == (
        "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com"
    )


async def test_a_long_expansion_is_cut_to_253_octets() -> None:
    sender = "x" * 60 + "@" + ".".join(["y" * 60] * 3) + ".test"
    evaluation = spf._Evaluation(Zone({}), spf._ip("192.0.2.3"), sender, "", "")
    out = evaluation.expand("%{l}.%{o}.%{o}.example.test", "example.test", domain_name=True)
    assert len(out) <= 253 and out.endswith(".example.test")


async def test_a_pass_and_the_explanation_of_a_fail() -> None:
    zone = Zone({
        "example.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 -all exp=why.example.test"]},
        "why.example.test": {"TXT": ["%{i} is not one of %{d}'s servers"]},
    })  # fmt: skip
    assert (await check(zone, "192.0.2.77")).result == "pass"
    assert (await check(zone, "2001:db8::5")).result == "pass"
    assert (await check(zone, "::ffff:192.0.2.77")).result == "pass"
    failed = await check(zone, "198.51.100.1")
    assert failed.result == "fail"
    assert failed.explanation == "198.51.100.1 is not one of example.test's servers"
