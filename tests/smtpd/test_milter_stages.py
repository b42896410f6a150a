"""The milter stages of an SMTP session (`smtpd.milter_stages`) against a real loopback
`TestMilter`, through a stand-in for the session: what each stage answers the core, what it
asks of the session (discard, client log, close on 421) and the Postfix-shaped log lines."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from tests.support import milter as tm
from tests.support.milter import TestMilter

from mailhaven.checks.milter.chain import MilterChain
from mailhaven.checks.milter.settings import MilterSettings, parse_endpoint
from mailhaven.proto import smtp_server_events as ev
from mailhaven.proto.address import MailParams, RcptParams
from mailhaven.proto.replies import Reply
from mailhaven.smtpd import milter_stages as stages
from mailhaven.smtpd.milter_stages import MilterHost
from mailhaven.smtpd.policy import SessionFacts

#: rspamd's negotiation: no reply owed for anything but end of message
RSPAMD_LIKE = 0xFF080


class FakeConn:
    """The core's side the stages use: answers recorded in order."""

    extended = True

    def __init__(self) -> None:
        self.mail: ev.MailFrom | None = None
        self.said: list[object] = []

    def accept(self) -> None:
        self.said.append("accept")

    def respond(self, reply: Reply) -> None:
        self.said.append(reply)


@dataclass
class FakeWriter:
    queue_id: str


@dataclass
class FakeHost:
    conn: FakeConn = field(default_factory=FakeConn)
    facts: SessionFacts = field(
        default_factory=lambda: SessionFacts("192.0.2.1", "client.example", "client.example")
    )
    writer: FakeWriter | None = None
    label: str = "client.example[192.0.2.1]"
    asked: list[object] = field(default_factory=list)

    def close_with(self, reply: Reply) -> None:
        self.asked.append(("close", reply))

    def discard_message(self) -> None:
        self.asked.append("discard")

    def log_client(self) -> None:
        self.asked.append("client")


class FakeTransport:
    def get_extra_info(self, name: str) -> Any:
        return {"peername": ("192.0.2.1", 4000), "sockname": ("127.0.0.1", 25)}.get(name)


def settings_for(milter: TestMilter) -> MilterSettings:
    return MilterSettings(
        endpoints=(parse_endpoint(milter.spec),),
        connect_timeout=2.0,
        command_timeout=2.0,
        content_timeout=2.0,
        hostname="mx.test",
    )


def started(milter: TestMilter, host: FakeHost) -> MilterChain:
    chain = stages.start(settings_for(milter), host.facts, "smtp", cast(Any, FakeTransport()))
    assert chain is not None
    return chain


def as_host(host: FakeHost) -> MilterHost:
    return cast(MilterHost, host)


MAIL = ev.MailFrom("bob@example.com", MailParams())
RCPT = ev.RcptTo("alice@example.org", RcptParams())
HELLO = ev.Hello("client.example", True)


def test_no_endpoints_or_no_transport_starts_nothing() -> None:
    facts = SessionFacts("192.0.2.1")
    assert stages.start(MilterSettings(), facts, "smtp", cast(Any, FakeTransport())) is None
    with TestMilter() as milter:
        assert stages.start(settings_for(milter), facts, "smtp", None) is None


async def test_connect_sends_the_client_and_postfix_macros() -> None:
    with TestMilter() as milter:
        host = FakeHost()
        chain = started(milter, host)
        slow = stages.helo(as_host(host), chain, HELLO)
        assert slow is not None  # the milter owes a HELO reply: the session waits for it
        await slow
        chain.close()
        connect = milter.seen("C")[0]
        macros = milter.seen("D")[0]
    assert host.conn.said == ["accept"] and host.asked == []
    assert connect.startswith(b"client.example\0") and b"192.0.2.1" in connect
    assert b"j\0mx.test\0" in macros and b"{daemon_name}\0smtp\0" in macros
    assert b"{daemon_addr}\x00127.0.0.1\x00" in macros


async def test_helo_refusal_421_closes_the_session(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailhaven.smtpd")
    with TestMilter({"H": [tm.replycode("421 4.7.0 go away")]}) as milter:
        host = FakeHost()
        chain = started(milter, host)
        slow = stages.helo(as_host(host), chain, HELLO)
        assert slow is not None
        await slow
        chain.close()
    refusal = Reply(421, "go away", "4.7.0")
    assert host.conn.said == [refusal]
    assert host.asked == [("close", refusal)]
    assert (
        "NOQUEUE: milter-reject: HELO from client.example[192.0.2.1]: 421 4.7.0 go away; "
        "from=<> proto=ESMTP helo=<client.example>"
    ) in caplog.messages


async def test_mail_refusal_discards_the_transaction(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailhaven.smtpd")
    with TestMilter({"M": [tm.replycode("550 5.7.1 not you")]}) as milter:
        host = FakeHost(writer=FakeWriter("QID1"))
        chain = started(milter, host)
        slow = stages.helo(as_host(host), chain, HELLO)
        assert slow is not None
        await slow
        slow = stages.mail(as_host(host), chain, MAIL, "QID1")
        assert slow is not None
        await slow
        chain.close()
        mail_macros = milter.seen("D")[-1]
    assert host.conn.said == ["accept", Reply(550, "not you", "5.7.1")]
    assert host.asked == ["discard"]
    assert b"i\0QID1\0" in mail_macros
    # NOQUEUE, as Postfix: the queue id was never given out
    assert (
        "NOQUEUE: milter-reject: MAIL from client.example[192.0.2.1]: 550 5.7.1 not you; "
        "from=<bob@example.com> proto=ESMTP helo=<client.example>"
    ) in caplog.messages


async def test_rcpt_accepted_logs_the_client_refused_logs_the_queue_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mailhaven.smtpd")
    with TestMilter({"R": [tm.cont(), tm.replycode("550 5.1.1 no such user")]}) as milter:
        host = FakeHost(writer=FakeWriter("QID1"))
        host.conn.mail = MAIL
        chain = started(milter, host)
        for slow in (
            stages.helo(as_host(host), chain, HELLO),
            stages.mail(as_host(host), chain, MAIL, "QID1"),
            stages.rcpt(as_host(host), chain, RCPT),
            stages.rcpt(as_host(host), chain, ev.RcptTo("carol@example.org", RcptParams())),
        ):
            assert slow is not None
            await slow
        chain.close()
    assert host.conn.said == ["accept"] * 3 + [Reply(550, "no such user", "5.1.1")]
    assert host.asked == ["client"]  # `<qid>: client=` at the first accepted recipient
    assert (
        "QID1: milter-reject: RCPT from client.example[192.0.2.1]: 550 5.1.1 no such user; "
        "from=<bob@example.com> to=<carol@example.org> proto=ESMTP helo=<client.example>"
    ) in caplog.messages


async def test_quick_stages_leave_the_answer_to_the_session() -> None:
    with TestMilter({"E": [tm.accept()]}, protocol=RSPAMD_LIKE) as milter:
        host = FakeHost(writer=FakeWriter("QID1"))
        chain = started(milter, host)
        first = stages.helo(as_host(host), chain, HELLO)
        assert first is not None  # not connected yet: the first stage waits for the connect
        await first
        assert stages.helo(as_host(host), chain, HELLO) is None
        assert stages.mail(as_host(host), chain, MAIL, "QID1") is None
        assert stages.rcpt(as_host(host), chain, RCPT) is None
        chain.close()  # sends what the quick stages queued, then QUIT
        await asyncio.sleep(0)
        seen = await asyncio.to_thread(milter.wait_seen, "R", 1)
    assert seen == [b"<alice@example.org>\0"]
    # only the slow HELO answered the core; the quick ones are the session's to accept
    assert host.conn.said == ["accept"] and host.asked == []
