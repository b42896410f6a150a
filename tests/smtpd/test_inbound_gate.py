"""smtpd.inbound_gate: who is checked, refusals abort the writer, forged fields are removed
under the same queue id, and a failing check lets the message through (fail open)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from mailhaven.checks.dmarc import OrgDomains
from mailhaven.checks.inbound import DomainPolicy, InboundChecks, InboundSettings
from mailhaven.net.dns import DNSAnswer, NoRecords, Records
from mailhaven.proto.envelope import Envelope, RecipientSpec
from mailhaven.smtpd.inbound_gate import InboundGate
from mailhaven.smtpd.policy import SessionFacts

ORGS = OrgDomains()


@dataclass
class Writer:
    queue_id: str
    data: bytearray = field(default_factory=bytearray)
    aborted: bool = False
    spilled: bool = False

    @property
    def size(self) -> int:
        return len(self.data)

    def head(self, limit: int) -> bytes:
        return bytes(self.data[:limit])

    def write(self, data: bytes) -> None:
        self.data += data

    def abort(self) -> None:
        self.aborted = True


class Zone:
    def __init__(self, txt: dict[str, str], *, explode: bool = False) -> None:
        self.txt, self.explode = txt, explode

    async def lookup(self, name: str, rdtype: str) -> DNSAnswer:
        if self.explode:
            raise RuntimeError("a bug in a lookup")
        value = self.txt.get(name) if rdtype == "TXT" else None
        return Records((value,), 300) if value else NoRecords(True)


ZONE = {"bank.test": "v=spf1 -all", "_dmarc.bank.test": "v=DMARC1; p=reject"}
FORGED = b"Authentication-Results: mx.test; dmarc=pass header.from=bank.test\r\n"
MESSAGE = b"From: <boss@bank.test>\r\nSubject: pay\r\n\r\nPay.\r\n"


def gate(zone: Zone, made: list[Writer]) -> InboundGate:
    checks = InboundChecks(InboundSettings("mx.test", DomainPolicy()), zone,
                           trusted=["10.0.0.0/8"], orgs=ORGS)  # fmt: skip

    def fresh(qid: str) -> Writer:
        made.append(Writer(qid))
        return made[-1]

    return InboundGate(checks, fresh)


def envelope(sender: str) -> Envelope:
    return Envelope(sender=sender, recipients=(RecipientSpec("a@mx.test"),))


@pytest.mark.parametrize(("ip", "user"), [("10.1.2.3", None), ("192.0.2.1", "alice")])
async def test_trusted_and_authenticated_clients_pass_unchecked(ip: str, user: str | None) -> None:
    writer = Writer("Q1", bytearray(MESSAGE))
    facts = SessionFacts(client_ip=ip, helo="h.test", auth_user=user)
    result = await gate(Zone(ZONE), []).run(facts, envelope("x@evil.test"), writer, "c")
    assert (result.reply, result.header, result.writer) == (None, b"", writer)


async def test_a_refusal_aborts_the_message() -> None:
    writer = Writer("Q1", bytearray(MESSAGE))
    facts = SessionFacts(client_ip="192.0.2.1", helo="h.test")
    result = await gate(Zone(ZONE), []).run(facts, envelope("x@evil.test"), writer, "c")
    assert result.reply is not None and result.reply.code == 550 and writer.aborted


async def test_forged_fields_are_removed_under_the_same_queue_id() -> None:
    zone = Zone({**ZONE, "_dmarc.bank.test": "v=DMARC1; p=none"})
    writer = Writer("Q7", bytearray(FORGED + MESSAGE))
    made: list[Writer] = []
    facts = SessionFacts(client_ip="192.0.2.1", helo="h.test")
    result = await gate(zone, made).run(facts, envelope("x@evil.test"), writer, "c")
    assert result.reply is None and writer.aborted
    assert result.writer is made[0] and made[0].queue_id == "Q7"
    assert bytes(made[0].data) == MESSAGE
    assert result.header.startswith(b"Authentication-Results: mx.test;")


async def test_a_failing_check_accepts_unchecked(caplog: pytest.LogCaptureFixture) -> None:
    writer = Writer("Q1", bytearray(MESSAGE))
    facts = SessionFacts(client_ip="192.0.2.1", helo="h.test")
    result = await gate(Zone(ZONE, explode=True), []).run(facts, envelope("x@evil.test"),
                                                          writer, "c")  # fmt: skip
    assert (result.reply, result.header, result.writer) == (None, b"", writer)
    assert not writer.aborted
    assert "accepted unchecked" in caplog.text
