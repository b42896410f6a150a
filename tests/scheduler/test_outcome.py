"""Judging an attempt (sent, bounced, deferred, expired) and its maillog line, whose
`status=S (text)` takes the shapes Postfix's smtp(8) and local(8) log."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mailhaven.proto.replies import Reply
from mailhaven.scheduler.backoff import DAY, BackoffPolicy
from mailhaven.scheduler.outcome import attempt_line, judge, status_text
from mailhaven.spool import Status
from mailhaven.spool.records import DueRecipient

MX = "mx.example[192.0.2.1]:25"


def remote(r: Reply, answered: str) -> Reply:
    return replace(r, answered=answered)


REFUSED = remote(
    Reply(550, "<bob@x.example>: Recipient address rejected: User unknown", "5.1.1"), "RCPT TO"
)


@pytest.mark.parametrize(
    ("r", "relay", "text"),
    [
        # what a remote server said: code and enhanced code first, like Postfix
        (remote(Reply(250, "Ok: queued as 4Xk9", "2.0.0"), "end of DATA"), MX,
         "250 2.0.0 Ok: queued as 4Xk9"),
        (remote(Reply(250, "ok", None), "end of DATA"), MX, "250 ok"),
        (REFUSED, MX,
         "host mx.example[192.0.2.1] said: 550 5.1.1 <bob@x.example>: Recipient address"
         " rejected: User unknown (in reply to RCPT TO command)"),
        (remote(Reply(451, "queue file write error", "4.3.0"), "end of DATA"), MX,
         "host mx.example[192.0.2.1] said: 451 4.3.0 queue file write error"
         " (in reply to end of DATA command)"),
        (remote(Reply(553, "sender rejected", "5.7.1"), "MAIL FROM"), "[2001:db8::1]:2525",
         "host [2001:db8::1] said: 553 5.7.1 sender rejected (in reply to MAIL FROM command)"),
        (remote(Reply(554, "no service", None, ("go away",)), "greeting"), MX,
         "host mx.example[192.0.2.1] refused to talk to me: 554-no service 554 go away"),
        (remote(Reply(421, "busy", "4.3.2"), "EHLO"), MX,
         "host mx.example[192.0.2.1] refused to talk to me: 421 4.3.2 busy"),
        (REFUSED, "none",  # no relay name: the reply alone
         "550 5.1.1 <bob@x.example>: Recipient address rejected: User unknown"),
        # our own words keep their shape
        (Reply(421, "connect to mx.example[192.0.2.1]:25: Connection refused", "4.4.1"), MX,
         "connect to mx.example[192.0.2.1]:25: Connection refused"),
        (Reply(451, "Host or domain name not found", "4.4.3"), "none",
         "Host or domain name not found"),
        (Reply(250, "delivered to maildir", "2.0.0"), "local", "delivered to maildir"),
        (Reply(421, "delivery temporarily suspended: connect to x[1.2.3.4]:25: no", "4.4.1"),
         "none", "delivery temporarily suspended: connect to x[1.2.3.4]:25: no"),
        (Reply(451), "none", "451"),
    ],
)  # fmt: skip
def test_status_text(r: Reply, relay: str, text: str) -> None:
    assert status_text(r, relay) == text


def test_attempt_line_for_a_remote_refusal() -> None:
    due = [DueRecipient("Q", 0, "bob@x.example", "bob@x.example", 0, 1000.0, 1000.0)]
    [verdict] = judge(due, {"bob@x.example": REFUSED}, policy=BackoffPolicy(), now=1001.0,
                      null_sender=False, relay=MX)  # fmt: skip
    line = attempt_line("Q", verdict, relay=MX, now=1001.0, delays=(0.5, 0.0, 0.0, 0.5))
    assert line == (
        "Q: to=<bob@x.example>, relay=mx.example[192.0.2.1]:25, delay=1, delays=0.5/0/0/0.5,"
        " dsn=5.1.1, status=bounced (host mx.example[192.0.2.1] said: 550 5.1.1 <bob@x.example>:"
        " Recipient address rejected: User unknown (in reply to RCPT TO command))"
    )


def test_the_stored_relay_names_only_a_host_that_said_the_reply() -> None:
    """Issue 16 #5: a timeout after connecting is our own words: the DSN must not read
    "host H said" nor name H as Remote-MTA, so the host is not stored with it."""
    due = [DueRecipient("Q", i, f"r{i}@x.example", f"r{i}@x.example", 0, 1000.0, 1000.0)
           for i in range(2)]  # fmt: skip
    ours = Reply(421, "conversation with mx.example[192.0.2.1] timed out while sending"
                 " RCPT TO", "4.4.2")  # fmt: skip
    replies = {"r0@x.example": REFUSED, "r1@x.example": ours}
    said, timed_out = judge(due, replies, policy=BackoffPolicy(), now=1001.0,
                            null_sender=False, relay=MX)  # fmt: skip
    assert said.update.relay == MX and timed_out.update.relay == "none"


def test_judge_and_log_line() -> None:
    due = [
        DueRecipient("Q", 0, "a@x.example", "list@x.example", 0, 1000.0, 1000.0),
        DueRecipient("Q", 1, "b@x.example", "b@x.example", 0, 1000.0, 1000.0),
        DueRecipient("Q", 2, "c@x.example", "c@x.example", 0, 1000.0, 1000.0),
    ]
    replies = {"a@x.example": Reply(250, "ok", "2.0.0"), "b@x.example": Reply(550, "no", "5.1.1")}
    verdicts = judge(due, replies, policy=BackoffPolicy(), now=1001.5, null_sender=False, relay="mx[1.2.3.4]")
    assert [v.label for v in verdicts] == ["sent", "bounced", "deferred"]
    assert [v.update.status for v in verdicts] == [Status.SENT, Status.BOUNCED, Status.DEFERRED]
    assert verdicts[2].update.next_attempt == 1301.5
    assert verdicts[2].reply.code == 451  # a missing reply is temporary
    line = attempt_line("Q", verdicts[0], relay="mx[1.2.3.4]", now=1001.5,
                        delays=(0.5, 0.0, 0.0, 1.0))
    assert line == (
        "Q: to=<a@x.example>, orig_to=<list@x.example>, relay=mx[1.2.3.4], delay=1.5,"
        " delays=0.5/0/0/1, dsn=2.0.0, status=sent (ok)"
    )
    late = judge(due[2:], {}, policy=BackoffPolicy(), now=1000.0 + 5 * DAY, null_sender=False)
    assert late[0].label == "expired" and late[0].update.status is Status.BOUNCED
