"""checks.inbound (with arc_verify): verdicts for whole messages over a fake zone."""

from __future__ import annotations

import asyncio
import random

import dkim
import pytest

from mailhaven.checks import arc_verify, inbound
from mailhaven.checks.dmarc import OrgDomains
from mailhaven.checks.inbound import DomainPolicy, InboundChecks, InboundSettings
from mailhaven.net.dns import DNSAnswer, DNSError, NoRecords, Records

ORGS = OrgDomains()
CLIENT = "192.0.2.10"


class Zone:
    def __init__(self, txt: dict[str, str], *, broken: set[str] = frozenset(),  # type: ignore[assignment]
                 silent: set[str] = frozenset()) -> None:  # type: ignore[assignment]  # fmt: skip
        self.txt, self.broken, self.silent = txt, broken, silent

    async def lookup(self, name: str, rdtype: str) -> DNSAnswer:
        if name in self.silent:
            await asyncio.sleep(3600)
        if name in self.broken:
            return DNSError("timeout")
        if rdtype == "TXT" and name in self.txt:
            return Records((self.txt[name],), 300)
        return NoRecords(True)


def zone(record: str, **kw: set[str]) -> Zone:
    return Zone({
        "bank.test": f"v=spf1 ip4:{CLIENT} -all",
        "_dmarc.bank.test": "v=DMARC1; p=reject",
        "sel._domainkey.bank.test": record,
        "soft.test": "v=spf1 ?all",
        "_dmarc.soft.test": "v=DMARC1; p=quarantine",
        "_dmarc.lax.test": "v=DMARC1; p=none",
    }, **kw)  # fmt: skip


def message(sender: str = "boss@bank.test", extra: bytes = b"") -> bytes:
    return (f"From: The Boss <{sender}>\r\nTo: you@mx.test\r\nSubject: pay\r\n".encode() + extra
            + b"Message-ID: <1@x>\r\n\r\nPay the invoice.\r\n")  # fmt: skip


def signed(msg: bytes, pem: bytes, domain: bytes = b"bank.test") -> bytes:
    return bytes(dkim.sign(msg, b"sel", domain, pem)) + msg


def checks(z: Zone, **policy: object) -> InboundChecks:
    settings = InboundSettings("mx.test", DomainPolicy(**policy))  # type: ignore[arg-type]
    return InboundChecks(settings, z, trusted=["127.0.0.0/8"], orgs=ORGS, rng=random.Random(0))


async def run(c: InboundChecks, msg: bytes, mail_from: str = "boss@bank.test",
              rcpts: tuple[str, ...] = ("you@mx.test",)) -> inbound.Verdict:  # fmt: skip
    return await c.check(msg, client_ip=CLIENT, helo="mail.bank.test", mail_from=mail_from,
                         recipients=list(rcpts))  # fmt: skip


async def test_a_good_message_passes_everything(dkim_key: tuple[bytes, str]) -> None:
    pem, record = dkim_key
    verdict = await run(checks(zone(record)), signed(message(), pem))
    assert verdict.reply is None
    head = verdict.header.decode()
    assert head.startswith("Authentication-Results: mx.test;")
    for part in ("spf=pass", "dkim=pass", "header.d=bank.test", "dmarc=pass", "arc=none"):
        assert part in head
    assert "spf=pass" in verdict.summary and "dmarc=pass" in verdict.summary


async def test_a_forged_from_of_a_reject_domain_is_refused(dkim_key: tuple[bytes, str]) -> None:
    _, record = dkim_key
    verdict = await run(checks(zone(record)), message(), mail_from="x@elsewhere.test")
    assert verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.enhanced) == (550, "5.7.1")
    # a domain may opt out of refusals: quarantined instead
    verdict = await run(checks(zone(record), dmarc_reject=False), message(), "x@elsewhere.test")
    assert verdict.reply is None and b"X-Mailhaven-Quarantine: dmarc" in verdict.header


async def test_quarantine_adds_the_header_and_none_adds_nothing(dkim_key: tuple[bytes, str]) -> None:
    _, record = dkim_key
    verdict = await run(checks(zone(record)), message("a@soft.test"), "a@soft.test")
    assert verdict.reply is None and b"X-Mailhaven-Quarantine" in verdict.header
    assert verdict.quarantine  # the mailbox files it into Junk
    verdict = await run(checks(zone(record)), message("a@lax.test"), "a@lax.test")
    assert verdict.reply is None and b"X-Mailhaven-Quarantine" not in verdict.header
    assert not verdict.quarantine


async def test_spf_fail_alone_refuses_only_when_asked(dkim_key: tuple[bytes, str]) -> None:
    pem, record = dkim_key
    msg = signed(message(), pem)  # DKIM-aligned: DMARC passes
    z = zone(record)
    other = "10.9.9.9"
    v = await checks(z).check(msg, client_ip=other, helo="h.test", mail_from="b@bank.test",
                              recipients=["you@mx.test"])  # fmt: skip
    assert v.reply is None and b"spf=fail" in v.header and b"dmarc=pass" in v.header
    v = await checks(z, spf_reject=True).check(msg, client_ip=other, helo="h.test",
                                               mail_from="b@bank.test", recipients=["y@mx.test"])  # fmt: skip
    assert v.reply is not None and (v.reply.code, v.reply.enhanced) == (550, "5.7.23")


async def test_temporary_dns_failures_accept_or_defer(dkim_key: tuple[bytes, str]) -> None:
    _, record = dkim_key
    z = zone(record, broken={"_dmarc.bank.test"})
    v = await run(checks(z), message(), "x@elsewhere.test")
    assert v.reply is None and b"dmarc=temperror" in v.header
    v = await run(checks(z, temperror="defer"), message(), "x@elsewhere.test")
    assert v.reply is not None and v.reply.code == 451 and v.reply.enhanced == "4.7.5"


async def test_the_most_lenient_recipient_domain_wins(dkim_key: tuple[bytes, str]) -> None:
    _, record = dkim_key
    settings = InboundSettings("mx.test", DomainPolicy(),
                               {"lenient.test": DomainPolicy(dmarc_reject=False)})  # fmt: skip
    c = InboundChecks(settings, zone(record), orgs=ORGS)
    v = await run(c, message(), "x@e.test", ("a@mx.test", "b@lenient.test"))
    assert v.reply is None and b"X-Mailhaven-Quarantine" in v.header
    v = await run(c, message(), "x@e.test", ("a@mx.test", "c@mx.test"))
    assert v.reply is not None and v.reply.code == 550


def test_who_is_checked() -> None:
    settings = InboundSettings("mx.test", DomainPolicy(), {"off.test": DomainPolicy(checks=False)})
    c = InboundChecks(settings, Zone({}), trusted=["127.0.0.0/8", "2001:db8::/32"], orgs=ORGS)
    assert c.applies("192.0.2.1", False, ["a@mx.test"])
    assert not c.applies("192.0.2.1", True, ["a@mx.test"])
    assert not c.applies("127.0.0.1", False, ["a@mx.test"])
    assert not c.applies("2001:db8::5", False, ["a@mx.test"])
    assert not c.applies("192.0.2.1", False, ["a@off.test"])
    assert c.applies("192.0.2.1", False, ["a@off.test", "b@mx.test"])


async def test_forged_authentication_results_are_reported(dkim_key: tuple[bytes, str]) -> None:
    _, record = dkim_key
    forged = b"Authentication-Results: mx.test; dmarc=pass header.from=bank.test\r\n"
    msg = forged + message()
    v = await run(checks(zone(record)), msg, "x@lax.test")
    assert v.forged == ((0, len(forged)),)


async def test_a_hung_dns_server_is_a_temperror_within_the_deadline(
    dkim_key: tuple[bytes, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, record = dkim_key
    monkeypatch.setattr(inbound, "CHECK_TIMEOUT", 0.3)
    z = zone(record, silent={"bank.test", "_dmarc.bank.test"})
    v = await asyncio.wait_for(run(checks(z), message()), 5)
    assert v.reply is None and b"spf=temperror" in v.header and b"dmarc=temperror" in v.header


async def test_a_message_too_large_to_verify_is_never_refused(dkim_key: tuple[bytes, str]) -> None:
    _, record = dkim_key
    settings = InboundSettings("mx.test", DomainPolicy(), max_verify_size=100)
    c = InboundChecks(settings, zone(record), orgs=ORGS)
    v = await run(c, message(), "x@elsewhere.test")
    assert v.reply is None and b"dkim=policy" in v.header


async def test_an_arc_chain_validates_and_a_broken_one_fails(dkim_key: tuple[bytes, str]) -> None:
    pem, record = dkim_key
    first = b"Authentication-Results: relay.bank.test; spf=pass smtp.mailfrom=bank.test\r\n" + message()
    sealed = b"".join(dkim.arc_sign(first, b"sel", b"bank.test", pem, b"relay.bank.test")) + first
    z = zone(record)
    assert (await arc_verify.verify(sealed, z)).result == "pass"
    assert (await arc_verify.verify(sealed.replace(b"invoice", b"bitcoin"), z)).result == "fail"
    assert (await arc_verify.verify(message(), z)).result == "none"
    broken = zone(record, broken={"sel._domainkey.bank.test"})
    assert (await arc_verify.verify(sealed, broken)).result == "fail"
    too_many = b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=x.test; s=s; b=AAAA\r\n" * 11 + message()
    got = await arc_verify.verify(too_many, z)
    assert got.result == "fail" and "more than" in got.reason


async def test_refusal_texts_quote_sender_data_safely(dkim_key: tuple[bytes, str]) -> None:
    _, record = dkim_key
    z = zone(record)
    z.txt["x" * 60 + ".bank.test"] = "v=DMARC1; p=reject"
    weird = "b\x1bo\u00e9@" + "x" * 60 + ".bank.test"
    v = await run(checks(z), message(weird), "x@elsewhere.test")
    assert v.reply is not None and v.reply.code == 550
    assert all(32 <= ord(c) < 127 for c in v.reply.text) and len(v.reply.text) < 300


async def test_mangled_messages_always_get_a_verdict(dkim_key: tuple[bytes, str]) -> None:
    """Bounded fuzz: cut, duplicated, byte-flipped and binary variants of a signed message
    (with an ARC set) each get a verdict, never an exception."""
    pem, record = dkim_key
    base = signed(message(), pem)
    sealed = b"".join(dkim.arc_sign(
        b"Authentication-Results: r.bank.test; none\r\n" + base, b"sel", b"bank.test", pem,
        b"r.bank.test")) + base  # fmt: skip
    rng = random.Random(18)
    c = checks(zone(record))
    variants = [b"", b"\r\n", b"\x00" * 50, base[:40], sealed.replace(b"\r\n", b"\n"),
                sealed.replace(b"\r\n\r\n", b"\r\n"), base * 3]  # fmt: skip
    for _ in range(150):
        data = bytearray(rng.choice([base, sealed]))
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(len(data))
            choice = rng.randrange(3)
            if choice == 0:
                data[at] = rng.randrange(256)
            elif choice == 1:
                del data[at : at + rng.randint(1, 40)]
            else:
                data[at:at] = rng.choice([b";", b"=", b"\r\n", b":", b"b=", b"\r\n ", b"\x00"])
        variants.append(bytes(data))
    for data in variants:
        verdict = await asyncio.wait_for(run(c, data), 10)
        assert verdict.header.startswith(b"Authentication-Results: mx.test;")
