"""The bounce role: which recipients are reported, to whom, from which sender."""

from __future__ import annotations

import email
import email.policy
from dataclasses import dataclass, field, replace

import pytest
from tests.fakes import FakeClock

from mailhaven.bounce.notifier import NoticeLimiter, Notifier
from mailhaven.intake.cleanup import Queued, Refused
from mailhaven.proto.envelope import Envelope, RecipientSpec
from mailhaven.proto.replies import Reply
from mailhaven.spool import QueuedRecipient, Spool
from mailhaven.spool.message_writer import MessageWriter
from mailhaven.spool.records import Hold, RecipientState, Status, StoredMessage


@dataclass
class FakeIntake:
    sent: list[tuple[Envelope, bytes]] = field(default_factory=list)

    async def submit(
        self, writer: MessageWriter, envelope: Envelope, *, tls: str | None = None
    ) -> Queued:
        self.sent.append((envelope, writer.head(1 << 20)))
        writer.abort()
        return Queued(writer.queue_id, Reply(250, "ok"))


def state(
    address: str, status: Status, reply: Reply | None, notify: tuple[str, ...] = ()
) -> RecipientState:
    return RecipientState(
        index=0,
        address=address,
        original=address,
        notify=notify,
        orcpt=None,
        status=status,
        hold=Hold.NONE,
        active=False,
        attempts=1,
        next_attempt=0.0,
        last_reply=reply,
        last_attempt=1_700_000_000.0,
        last_relay="mx.example.net[127.0.0.2]:25",
    )


async def stored(spool: Spool, sender: str) -> StoredMessage:
    w = spool.new_message()
    w.write(b"Subject: original\r\nMessage-ID: <m1@x>\r\n\r\nbody\r\n")
    env = Envelope(sender, (RecipientSpec("bob@example.net"),))
    qid = await spool.commit(w, env, [QueuedRecipient("bob@example.net", "bob@example.net")], b"")
    msg = await spool.load(qid)
    assert msg is not None
    return msg


def notifier(spool: Spool, intake: FakeIntake) -> Notifier:
    return Notifier(spool, lambda: intake, hostname="mx.test", postmaster="postmaster@mx.test")  # type: ignore[arg-type,return-value]


NO_USER = Reply(550, "no such user", "5.1.1")


async def test_failure_report_goes_to_sender_from_null_sender(spool: Spool) -> None:
    intake = FakeIntake()
    msg = await stored(spool, "alice@example.org")
    await notifier(spool, intake).on_failures(
        msg, [state("bob@example.net", Status.BOUNCED, NO_USER)]
    )
    [(env, data)] = intake.sent
    assert env.sender == "" and [r.address for r in env.recipients] == ["alice@example.org"]
    report = email.message_from_bytes(data, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    status = report.get_payload()[1]  # type: ignore[index]
    assert (
        "Status: 5.1.1" in status.as_string()
        and "Remote-MTA: dns; mx.example.net" in status.as_string()
    )


async def test_double_bounce_goes_to_postmaster_and_never_loops(spool: Spool) -> None:
    intake = FakeIntake()
    n = notifier(spool, intake)
    bounce = await stored(spool, "")
    await n.on_failures(bounce, [state("bob@example.net", Status.BOUNCED, NO_USER)])
    [(env, _)] = intake.sent
    assert env.sender == "double-bounce@mx.test"
    assert [r.address for r in env.recipients] == ["postmaster@mx.test"]
    double = await stored(spool, "double-bounce@mx.test")
    await n.on_failures(double, [state("postmaster@mx.test", Status.BOUNCED, NO_USER)])
    assert len(intake.sent) == 1  # the failed double bounce is only logged


async def test_notify_never_and_success(spool: Spool) -> None:
    intake = FakeIntake()
    n = notifier(spool, intake)
    msg = await stored(spool, "alice@example.org")
    await n.on_failures(msg, [state("bob@example.net", Status.BOUNCED, NO_USER, ("NEVER",))])
    assert intake.sent == []
    ok = Reply(250, "Ok", "2.0.0")
    await n.on_failures(msg, [state("bob@example.net", Status.SENT, ok, ("SUCCESS",))])
    [(_, data)] = intake.sent
    text = data.decode()
    assert "Successful Mail Delivery Report" in text and "Action: relayed" in text


async def test_expired_reports_last_temporary_error_as_permanent(spool: Spool) -> None:
    intake = FakeIntake()
    msg = await stored(spool, "alice@example.org")
    busy = Reply(451, "try later", "4.3.0")
    await notifier(spool, intake).on_failures(msg, [state("bob@example.net", Status.BOUNCED, busy)])
    text = intake.sent[0][1].decode()
    assert "Status: 5.3.0" in text and "Action: failed" in text
    assert "451 4.3.0 try later" in text
    assert replace(busy).code == 451


@pytest.mark.parametrize(
    ("relay", "reply", "story"),
    [
        (  # a DNS failure: no host at all
            "none",
            Reply(
                550,
                "Host or domain name not found. Name service error for name=x.test"
                " type=MX: Host not found",
                "5.4.4",
            ),
            "<bob@example.net>: Host or domain name not found.",
        ),
        (  # our own words about a host that said nothing (stored by the scheduler as "none")
            "none",
            Reply(421, "connect to mx.x.test[127.0.0.1]:3999: Connection refused", "4.4.1"),
            "<bob@example.net>: connect to mx.x.test[127.0.0.1]:3999: Connection refused",
        ),
    ],
)
async def test_reports_name_no_remote_mta_that_said_nothing(
    spool: Spool, relay: str, reply: Reply, story: str
) -> None:
    """Issue 16 #5: no `host none said:`, no `Remote-MTA: dns; none`, no made-up code."""
    intake = FakeIntake()
    msg = await stored(spool, "alice@example.org")
    bounced = replace(state("bob@example.net", Status.BOUNCED, reply), last_relay=relay)
    await notifier(spool, intake).on_failures(msg, [bounced])
    [(_, data)] = intake.sent
    text = data.decode()
    assert "said" not in text and "Remote-MTA" not in text and "none" not in text
    assert story in " ".join(text.split()).replace("> : ", ">: ")
    report = email.message_from_bytes(data, policy=email.policy.default)
    status = report.get_payload()[1].as_string()  # type: ignore[index]
    diagnostic = " ".join(status.partition("Diagnostic-Code:")[2].split())
    assert diagnostic.startswith("X-Mailhaven; " + " ".join(reply.text.split())[:30])


def test_notice_limiter_is_a_token_bucket_per_address() -> None:
    limiter = NoticeLimiter(2, 3600.0)
    assert limiter.allow("Forged@victim.example", 0.0)
    assert limiter.allow("forged@victim.example", 1.0)  # the same address, any case
    assert not limiter.allow("forged@victim.example", 2.0)  # the third within the hour
    assert limiter.allow("other@victim.example", 2.0)  # counted per address
    assert not limiter.allow("forged@victim.example", 1000.0)  # refilled 0.55 of one by now
    assert limiter.allow("forged@victim.example", 1802.0)  # half an hour: one notice back
    assert NoticeLimiter(0, 3600.0).allow("x@y", 0.0)  # 0: no limit


async def test_notices_to_one_address_are_rate_limited(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 16 #23: backscatter to a forged sender is capped per address; the surplus is
    logged, not queued."""
    intake = FakeIntake()
    clock = FakeClock()
    notes = Notifier(spool, lambda: intake, hostname="mx.test", postmaster="postmaster@mx.test",  # type: ignore[arg-type,return-value]
                     clock=clock, limiter=NoticeLimiter(2, 3600.0))  # fmt: skip
    victim = [await stored(spool, "victim@example.org") for _ in range(3)]
    other = await stored(spool, "someone@example.org")
    with caplog.at_level("WARNING", logger="mailhaven.bounce"):
        for msg in [*victim, other]:
            await notes.on_failures(msg, [state("bob@example.net", Status.BOUNCED, NO_USER)])
    assert [e.recipients[0].address for e, _ in intake.sent] == [
        "victim@example.org",
        "victim@example.org",
        "someone@example.org",
    ]
    assert any(
        f"{victim[2].queue_id}: sender non-delivery notification to <victim@example.org>"
        " suppressed" in m
        for m in caplog.messages
    )
class FullIntake(FakeIntake):
    """Intake on a full spool: `452 4.3.1`, a temporary refusal."""

    async def submit(  # type: ignore[override]
        self, writer: MessageWriter, envelope: Envelope, *, tls: str | None = None
    ) -> Refused:
        writer.abort()
        return Refused(Reply(452, "Insufficient system storage", "4.3.1"))


async def test_a_report_refused_for_now_fails_the_hook_so_the_message_is_kept(
    spool: Spool,
) -> None:
    msg = await stored(spool, "alice@example.org")
    with pytest.raises(OSError, match=r"4\.3\.1"):
        await notifier(spool, FullIntake()).on_failures(
            msg, [state("bob@example.net", Status.BOUNCED, NO_USER)]
        )
