"""End to end: rspamd's "add header" verdict files the message into the recipient's Junk folder.

A private rspamd (`tests.support.rspamd`, thresholds add_header 6 / reject 15) scans what the MX
listener receives. A message whose Subject carries `rspamd.SPAM_MARK` scores 10: rspamd accepts
it and adds `X-Spam: Yes`, so it lands in alice's `Maildir/.Junk/new/` (and a private Dovecot
lists it in the IMAP folder Junk); a clean message lands in the INBOX; a sender that writes
`X-Spam: Yes` itself does not reach Junk (only the milter's own header edits count). The same
with SpamAssassin (spamass-milter, reject at 15, a test rule scoring 10): its `X-Spam-Flag:
YES` files the message into Junk.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.e2e.conftest import ServerFactory
from tests.e2e.test_dovecot_imap import MAIL_GROUP, MAIL_USER, add_user, imap
from tests.support import dovecot as dc
from tests.support import rspamd, spamassassin
from tests.support.server import MailServer

pytestmark = pytest.mark.e2e


def message(mark: str, subject: str, extra: str = "") -> str:
    return (
        f"From: bob@example.com\r\nTo: alice@example.org\r\nSubject: {subject}\r\n{extra}"
        f"Date: Fri, 04 Dec 2026 12:00:00 +0000\r\nMessage-ID: <{mark}@example.com>\r\n"
        f"\r\nhello {mark}\r\n"
    )


def send(server: MailServer, text: str, to: str = "alice@example.org") -> None:
    with smtplib.SMTP(server.host, server.smtp_port, timeout=60) as client:
        assert client.sendmail("bob@example.com", [to], text) == {}


def folder_files(maildir: Path, folder: str) -> list[Path]:
    base = maildir / f".{folder}" if folder else maildir
    return sorted((base / "new").glob("*")) if (base / "new").is_dir() else []


def wait_in(server: MailServer, user: str, folder: str, mark: str) -> bytes:
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for path in folder_files(server.maildir(user), folder):
            data = path.read_bytes()
            if mark.encode() in data:
                return data
        time.sleep(0.05)
    raise AssertionError(f"{mark} not in {folder or 'INBOX'} of {user}\n{server.log_tail()}")


def test_spam_below_reject_lands_in_junk(milter_mx: MailServer) -> None:
    mark = uuid.uuid4().hex
    send(milter_mx, message(mark, f"offer {rspamd.SPAM_MARK}"))
    data = wait_in(milter_mx, "alice", "Junk", mark)
    assert b"X-Spam: Yes" in data
    inbox = folder_files(milter_mx.maildir("alice"), "")
    assert not any(mark.encode() in p.read_bytes() for p in inbox)
    milter_mx.wait_for_log(r"\w+: milter-junk: X-Spam: Yes")
    # Dovecot and IMAP clients see the folder: marked and subscribed
    assert (milter_mx.maildir("alice") / ".Junk" / "maildirfolder").exists()
    assert "Junk" in (milter_mx.maildir("alice") / "subscriptions").read_text().split()


def test_clean_mail_lands_in_the_inbox(milter_mx: MailServer) -> None:
    mark = uuid.uuid4().hex
    send(milter_mx, message(mark, "lunch on friday"))
    data = wait_in(milter_mx, "alice", "", mark)
    assert b"X-Spamd-Result:" in data and b"X-Spam: Yes" not in data


def test_a_senders_own_spam_header_does_not_count(milter_mx: MailServer) -> None:
    mark = uuid.uuid4().hex
    send(milter_mx, message(mark, "lunch on saturday", extra="X-Spam: Yes\r\nX-Spam-Flag: YES\r\n"))
    wait_in(milter_mx, "alice", "", mark)
    assert not any(mark.encode() in p.read_bytes()
                   for p in folder_files(milter_mx.maildir("alice"), "Junk"))


@pytest.mark.skipif(not dc.available(), reason="dovecot-imapd is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="a private Dovecot needs root to switch users")
def test_dovecot_shows_the_spam_in_junk(
    scanner: rspamd.RspamdInstance, mail_server: ServerFactory, tmp_path: Path
) -> None:
    top = Path(tempfile.mkdtemp(prefix="mailhaven-dovecot-"))
    os.chmod(top, 0o755)
    try:
        users = top / "users.passwd"
        server = mail_server(
            start=False,
            services=("smtp",),
            settings={
                "local_domains": ["a.example"],
                "users_file": str(users),
                "mailbox": {
                    "mail_dir": str(top / "mail"), "mail_user": MAIL_USER,
                    "mail_group": MAIL_GROUP, "dir_mode": 0o770, "file_mode": 0o660,
                    "users_file_mode": 0o640, "users_file_group": "dovecot",
                },
                "checks": {"milter": {"smtpd": [scanner.spec]}},
            },
        )
        add_user(server, "alice@a.example", "alice pw")
        server.start()
        spam, ham = uuid.uuid4().hex, uuid.uuid4().hex
        send(server, message(spam, f"deal {rspamd.SPAM_MARK}"), "alice@a.example")
        send(server, message(ham, "minutes"), "alice@a.example")
        wait_in(server, "alice@a.example", "Junk", spam)
        wait_in(server, "alice@a.example", "", ham)
        with dc.Dovecot(tmp_path / "dovecot", users_file=users, mail_dir=top / "mail",
                        mail_user=MAIL_USER, mail_group=MAIL_GROUP) as dovecot, \
                imap(dovecot, "alice@a.example", "alice pw") as client:
            status, listed = client.lsub()
            assert status == "OK" and any(b"Junk" in line for line in listed if line)
            client.select("Junk", readonly=True)
            _, found = client.search(None, "SUBJECT", rspamd.SPAM_MARK)
            assert len(found[0].split()) == 1
            client.select("INBOX", readonly=True)
            _, found = client.search(None, "SUBJECT", rspamd.SPAM_MARK)
            assert found[0].split() == []
            _, found = client.search(None, "SUBJECT", "minutes")
            assert len(found[0].split()) == 1
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="module")
def assassin() -> Iterator[spamassassin.SpamAssassinMilter]:
    reason = spamassassin.skip_reason()
    if reason:
        pytest.skip(reason)
    with spamassassin.SpamAssassinMilter(reject=15, site_rules=spamassassin.JUNK_RULE) as milter:
        yield milter


def test_spamassassin_spam_below_reject_lands_in_junk(
    assassin: spamassassin.SpamAssassinMilter, mail_server: ServerFactory
) -> None:
    """SpamAssassin's `X-Spam-Flag: YES` (spamass-milter adds it) is the other default verdict."""
    server = mail_server(settings={
        "local_domains": ["example.org"], "local_users": ["postmaster", "alice"],
        "checks": {"milter": {"smtpd": [assassin.spec]}},
    })
    spam, ham = uuid.uuid4().hex, uuid.uuid4().hex
    send(server, message(spam, f"offer {spamassassin.SPAM_MARK}"))
    send(server, message(ham, "agenda"))
    data = wait_in(server, "alice", "Junk", spam)
    assert b"X-Spam-Flag: YES" in data
    assert b"X-Spam-Flag: YES" not in wait_in(server, "alice", "", ham)
    server.wait_for_log(r"\w+: milter-junk: X-Spam-Flag: YES")
