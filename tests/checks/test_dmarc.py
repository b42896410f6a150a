"""checks.dmarc: alignment, policy discovery, p/sp/pct, and DNS failures (RFC 7489)."""

from __future__ import annotations

import random

import pytest

from mailhaven.checks import dmarc
from mailhaven.checks.dkim_verify import DKIMResult
from mailhaven.checks.spf import SPFResult
from mailhaven.net.dns import DNSAnswer, DNSError, NoRecords, Records

ORGS = dmarc.OrgDomains()


class Zone:
    def __init__(self, txt: dict[str, list[str]], broken: set[str] | None = None) -> None:
        self.txt = txt
        self.broken = broken or set()

    async def lookup(self, name: str, rdtype: str) -> DNSAnswer:
        if name in self.broken:
            return DNSError("timeout")
        values = self.txt.get(name)
        return Records(tuple(values), 300) if values else NoRecords(True)


REJECT = Zone({"_dmarc.example.co.uk": ["v=DMARC1; p=reject; sp=quarantine; rua=mailto:d@example.co.uk"]})


def sig(domain: str, result: str = "pass") -> DKIMResult:
    return DKIMResult(result, domain=domain)  # type: ignore[arg-type]


async def evaluate(from_domain: str, spf: SPFResult | None, sigs: list[DKIMResult],
                   zone: Zone = REJECT, **kw: object) -> dmarc.DMARCResult:  # fmt: skip
    return await dmarc.evaluate(from_domain, spf, sigs, zone, ORGS, **kw)  # type: ignore[arg-type]


async def test_aligned_dkim_or_spf_passes() -> None:
    assert (await evaluate("example.co.uk", None, [sig("example.co.uk")])).result == "pass"
    # relaxed alignment: the same organizational domain (the PSL knows co.uk is a suffix)
    assert (await evaluate("example.co.uk", None, [sig("mail.example.co.uk")])).result == "pass"
    spf = SPFResult("pass", "bounces.example.co.uk")
    assert (await evaluate("example.co.uk", spf, [])).result == "pass"


async def test_unaligned_passes_fail_with_the_policy() -> None:
    spf = SPFResult("pass", "other.co.uk")  # a different organization under the same suffix
    got = await evaluate("example.co.uk", spf, [sig("attacker.test"), sig("example.co.uk", "fail")])
    assert (got.result, got.policy, got.disposition) == ("fail", "reject", "reject")


async def test_a_subdomain_gets_sp() -> None:
    got = await evaluate("news.example.co.uk", None, [])
    assert (got.result, got.policy, got.policy_domain) == ("fail", "quarantine", "example.co.uk")


async def test_strict_alignment() -> None:
    zone = Zone({"_dmarc.example.test": ["v=DMARC1; p=reject; adkim=s; aspf=s"]})
    assert (await evaluate("example.test", None, [sig("mail.example.test")], zone)).result == "fail"
    assert (await evaluate("example.test", None, [sig("example.test")], zone)).result == "pass"


async def test_no_record_is_none() -> None:
    assert (await evaluate("example.test", None, [], Zone({}))).result == "none"
    two = Zone({"_dmarc.example.test": ["v=DMARC1; p=reject", "v=DMARC1; p=none"]})
    assert (await evaluate("example.test", None, [], two)).result == "none"
    junk = Zone({"_dmarc.example.test": ["v=DMARC1; p=bogus"]})
    assert (await evaluate("example.test", None, [], junk)).result == "none"
    with_rua = Zone({"_dmarc.example.test": ["v=DMARC1; p=bogus; rua=mailto:a@example.test"]})
    got = await evaluate("example.test", None, [], with_rua)
    assert (got.result, got.policy) == ("fail", "none")


async def test_pct_samples_with_the_next_milder_policy() -> None:
    zone = Zone({"_dmarc.example.test": ["v=DMARC1; p=reject; pct=0"]})
    got = await evaluate("example.test", None, [], zone, rng=random.Random(1))
    assert (got.policy, got.disposition) == ("reject", "quarantine")
    zone = Zone({"_dmarc.example.test": ["v=DMARC1; p=quarantine; pct=100"]})
    got = await evaluate("example.test", None, [], zone, rng=random.Random(1))
    assert got.disposition == "quarantine"


async def test_dns_failures_are_temperror() -> None:
    broken = Zone({}, broken={"_dmarc.example.test"})
    assert (await evaluate("example.test", None, [], broken)).result == "temperror"
    # the policy is known, but the aligned signature's key lookup failed: pass was possible
    zone = Zone({"_dmarc.example.test": ["v=DMARC1; p=reject"]})
    got = await evaluate("example.test", None, [sig("example.test", "temperror")], zone)
    assert (got.result, got.policy) == ("temperror", "reject")


@pytest.mark.parametrize("domain", ["", "localhost", "."])
async def test_no_usable_from_domain(domain: str) -> None:
    assert (await evaluate(domain, None, [])).result == "permerror"


def test_record_parsing_is_lenient_where_the_rfc_is() -> None:
    record = dmarc.parse_record("v=DMARC1;p=Reject ; pct=50;adkim=S; unknown=1")
    assert record == dmarc.DMARCRecord("reject", "reject", 50, True, False)
    assert dmarc.parse_record("p=reject; v=DMARC1") is None
    assert dmarc.parse_record("v=DMARC1; p=reject; pct=xx").percent == 100  # type: ignore[union-attr]
