"""Quotas end to end with `mailhaven serve`: 452 at RCPT, deferral at delivery, a bounce only
after the queue lifetime, and POP3 deletions that make room for the deferred message."""

from __future__ import annotations

import poplib
import smtplib
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from tests.e2e.conftest import ServerFactory
from tests.e2e.send_support import read_dsn, send, wait_attempt
from tests.support.server import MailServer

from mailhaven.mailbox import quota
from mailhaven.mailbox.users import UserDB

pytestmark = pytest.mark.e2e

FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
BIG = "x" * 1500


def settings(tmp_path: Path, lifetime: float) -> dict[str, object]:
    users = tmp_path / "users.passwd"
    UserDB(users, hasher=FAST_HASHER).add("bob", "secret")
    return {
        "local_users": ["postmaster", "alice"],
        "users_file": str(users),
        "queue": {"minimal_backoff": 1, "maximal_backoff": 1, "lifetime": lifetime},
        "quota": {"users": {"bob": "2k"}},  # 2 KiB: one message of ~1.6 KB fits, two do not
    }


def send_big(server: MailServer, mark: str) -> str:
    with smtplib.SMTP(server.host, server.smtp_port, timeout=20) as s:
        s.ehlo("client.test")
        s.mail("alice@localhost")
        code, text = s.rcpt("bob@localhost")
        assert code == 250, text
        code, text = s.data(
            f"From: alice@localhost\r\nTo: bob@localhost\r\nSubject: {mark}\r\n\r\n{BIG}\r\n"
        )
        assert code == 250, text
        return text.decode().rsplit(" ", 1)[-1]


def test_full_mailbox_defers_then_bounces_after_lifetime(
    tmp_path: Path, mail_server: ServerFactory
) -> None:
    server = mail_server(settings=settings(tmp_path, lifetime=4))
    first = send_big(server, "first")
    wait_attempt(server, first, "bob@localhost", "sent")
    second = send_big(server, "second")
    [deferred] = wait_attempt(server, second, "bob@localhost", "deferred")
    assert "dsn=4.2.2, status=deferred" in deferred.string and "quota" in deferred.string
    # not bounced at once: a bounce comes only once the message outlived [queue] lifetime
    wait_attempt(server, second, "bob@localhost", "deferred", count=2, timeout=15)
    server.wait_for_log(rf"{second}: from=<alice@localhost>, status=expired", timeout=20)
    server.wait_for_log(r"to=<alice@localhost>, relay=local, .*status=sent", timeout=10)
    notices = sorted((server.maildir("alice") / "new").iterdir())
    [dsn] = [read_dsn(p) for p in notices]
    [group] = dsn.per_recipient
    assert group["Status"].split()[0][1:] == ".2.2"  # mailbox full (X.2.2, RFC 3463)
    assert group["Action"] == "failed"
    # a message that cannot fit: the MX says so at RCPT (452 4.2.2) when SIZE= tells it,
    # and other mailboxes are not affected
    with smtplib.SMTP(server.host, server.smtp_port, timeout=20) as s:
        s.ehlo("client.test")
        s.mail("alice@localhost", ["SIZE=1500"])
        code, text = s.rcpt("bob@localhost")
        assert (code, text[:5]) == (452, b"4.2.2"), text
        assert s.rcpt("alice@localhost")[0] == 250
    assert "Traceback" not in server.log()


def test_pop3_delete_makes_room_for_the_deferred_message(
    tmp_path: Path, mail_server: ServerFactory
) -> None:
    server = mail_server(settings=settings(tmp_path, lifetime=3600), services=("smtp", "pop3"))
    first = send_big(server, "first")
    wait_attempt(server, first, "bob@localhost", "sent")
    second = send_big(server, "second")
    wait_attempt(server, second, "bob@localhost", "deferred")
    box = server.maildir("bob")
    limit = quota.Limit(2048, 0)
    full = quota.read(box, limit)
    assert full is not None and full.messages == 1
    pop = poplib.POP3(server.host, server.port("pop3"), timeout=10)
    pop.user("bob")
    pop.pass_("secret")
    assert pop.stat()[0] == 1
    pop.dele(1)
    pop.quit()
    wait_attempt(server, second, "bob@localhost", "sent", timeout=15)
    used = quota.read(box, limit)
    assert used is not None and used.messages == 1 and used == quota.measure(box)
    assert len(list((box / "new").iterdir())) == 1
    assert send(server, ["alice@localhost"], mark="other")  # unaffected
