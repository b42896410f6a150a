"""RCPT-time quota check: 452 4.2.2 only for a single local mailbox known to be full."""

from __future__ import annotations

from pathlib import Path

from mailhaven.checks.mailbox_full import MailboxFull
from mailhaven.mailbox.maildir import ensure_maildir, mailbox_path
from mailhaven.mailbox.quota import QuotaRules
from mailhaven.routing.router import Router

ROUTER = Router(
    local_domains=["a.example"],
    mailboxes=lambda: {"alice", "bob"},
    aliases={"both": ["alice", "bob"], "al": ["alice"]},
)


def check(tmp_path: Path, rule: str = "100B") -> MailboxFull:
    rules = QuotaRules.parse(rule, {}, {})
    return MailboxFull(lambda: ROUTER, lambda: rules, tmp_path)


def full(tmp_path: Path, user: str, content: bytes = b"100S\n100 1\n") -> None:
    """Write `content` as the maildirsize of the mailbox `user@a.example` routes to."""
    box = mailbox_path(tmp_path, ROUTER.route(f"{user}@a.example").nexthop)
    ensure_maildir(box)
    (box / "maildirsize").write_bytes(content)


def test_full_mailbox_refused(tmp_path: Path) -> None:
    full(tmp_path, "alice")
    refusal = check(tmp_path)("alice@a.example", None)
    assert refusal is not None
    assert (refusal.code, refusal.enhanced) == (452, "4.2.2")
    assert check(tmp_path)("al@a.example", None) is not None  # an alias to one mailbox


def test_room_left_or_unknown_is_accepted(tmp_path: Path) -> None:
    c = check(tmp_path)
    assert c("bob@a.example", None) is None  # no file yet: not known, delivery decides
    full(tmp_path, "bob", b"100S\n50 1\n")
    assert c("bob@a.example", None) is None
    assert c("bob@a.example", 51) is not None  # SIZE= would not fit
    full(tmp_path, "bob", b"garbage")
    assert c("bob@a.example", None) is None  # corrupt: unknown at RCPT time


def test_alias_to_several_and_remote_are_not_judged(tmp_path: Path) -> None:
    full(tmp_path, "alice")
    c = check(tmp_path)
    assert c("both@a.example", None) is None
    assert c("someone@remote.example", None) is None


def test_no_quota_configured(tmp_path: Path) -> None:
    full(tmp_path, "alice")
    assert check(tmp_path, "")("alice@a.example", None) is None
