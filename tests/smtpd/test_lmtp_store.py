"""The LMTP listener's store and policy: direct delivery, one verdict per recipient."""

from __future__ import annotations

from pathlib import Path

from tests.fakes import maildir_messages

from mailhaven.delivery.local import LocalAgent
from mailhaven.mailbox.maildir import ensure_maildir, mailbox_path
from mailhaven.mailbox.quota import QuotaRules
from mailhaven.proto import smtp_server_events as ev
from mailhaven.proto.address import RcptParams
from mailhaven.proto.envelope import Envelope, RecipientSpec
from mailhaven.proto.replies import Reply
from mailhaven.routing.router import Router
from mailhaven.smtpd.lmtp_store import LmtpStore, combine, lmtp_policy
from mailhaven.smtpd.policy import SessionFacts

BODY = b"From: s@remote.example\r\nSubject: over lmtp\r\n\r\nhello\r\n"


def router() -> Router:
    return Router(
        local_domains=["store.example"],
        mailboxes=lambda: {"alice@store.example", "bob@store.example", "carol@store.example"},
        aliases={"team": ["alice", "bob"], "away": ["someone@remote.example"]},
        transport_map={"dovecot.example": "lmtp:unix:/nowhere"},
    )


def store(root: Path, quota: str = "") -> LmtpStore:
    rules = QuotaRules.parse(quota, {}, {"bob": "1B"} if quota else {})
    agent = LocalAgent(root / "mail", "mx.example", quotas=lambda: rules)
    return LmtpStore(router, agent, hostname="mx.example", spool_dir=root / "tmp",
                     mailboxes=lambda: {"alice@store.example", "bob@store.example", "carol@store.example"})


def envelope(*rcpts: str) -> Envelope:
    return Envelope(
        sender="s@remote.example", recipients=tuple(RecipientSpec(r) for r in rcpts),
        client_address="127.0.0.1", helo="postfix.example", protocol="LMTP",
    )


def box(root: Path, address: str) -> Path:
    """The Maildir `address` routes to."""
    return mailbox_path(root / "mail", router().route(address).nexthop)


def messages(root: Path, user: str) -> list[bytes]:
    return maildir_messages(box(root, f"{user}@store.example"))


async def test_each_recipient_gets_its_own_verdict(tmp_path: Path) -> None:
    s = store(tmp_path, quota="1G")
    ensure_maildir(box(tmp_path, "bob@store.example"))
    (box(tmp_path, "bob@store.example") / "maildirsize").write_bytes(b"1S\n5 1\n")  # full
    writer = s.new_message()
    for i in range(0, len(BODY), 7):
        writer.write(BODY[i : i + 7])
    replies = await s.deliver(writer, envelope(
        "alice@store.example", "bob@store.example", "nobody@store.example"
    ))
    assert [(r.code, r.enhanced) for r in replies] == [
        (250, "2.0.0"), (452, "4.2.2"), (550, "5.1.1"),
    ]
    [copy] = messages(tmp_path, "alice")
    assert copy.startswith(
        b"Return-Path: <s@remote.example>\nDelivered-To: alice@store.example\n"
        b"Received: from postfix.example (unknown [127.0.0.1])\n"
    )
    assert b"with LMTP id " in copy
    assert copy.endswith(b"Subject: over lmtp\n\nhello\n")
    assert list((tmp_path / "tmp").iterdir()) == []  # nothing left behind


async def test_alias_needs_every_copy(tmp_path: Path) -> None:
    s = store(tmp_path)
    writer = s.new_message()
    writer.write(BODY)
    [team] = await s.deliver(writer, envelope("team@store.example"))
    assert team.code == 250
    assert len(messages(tmp_path, "alice")) == len(messages(tmp_path, "bob")) == 1


def test_policy_takes_only_local_mailboxes() -> None:
    policy = lmtp_policy(router)
    facts = SessionFacts(client_ip="127.0.0.1")

    def rcpt(address: str) -> Reply | None:
        return policy.rcpt_to(facts, ev.RcptTo(address, RcptParams()))

    assert rcpt("alice@store.example") is None
    assert rcpt("team@store.example") is None
    for refused in ("away@store.example", "x@remote.example", "a@dovecot.example",
                    "nobody@store.example"):
        answer = rcpt(refused)
        assert answer is not None and answer.code in (550, 554), refused


def test_combine() -> None:
    ok = Reply(250, "ok", "2.0.0")
    soft = Reply(452, "full", "4.2.2")
    hard = Reply(550, "no", "5.1.1")
    assert combine("a", [ok, ok]).code == 250
    assert combine("a", [ok, hard, soft]) is soft
    assert combine("a", [ok, hard]) is hard
    assert combine("a", []).code == 550


async def test_loop_and_missing_mailbox_are_per_recipient(tmp_path: Path) -> None:
    s = store(tmp_path)
    writer = s.new_message()
    writer.write(b"Delivered-To: alice@store.example\r\n" + BODY)
    replies = await s.deliver(writer, envelope("alice@store.example", "bob@store.example"))
    assert [(r.code, r.enhanced) for r in replies] == [(554, "5.4.6"), (250, "2.0.0")]
    assert messages(tmp_path, "alice") == []
