"""End to end: greylisting (RFC 6647) on a real `mailhaven serve`: a new triplet is deferred,
a retry too early is deferred again, the retry after the delay passes even across a restart of
the server (the triplets are on disk), and the client network is then allowed at once for other
senders. Clients come from 127.0.0.N (`trusted_networks` is empty)."""

from __future__ import annotations

import smtplib
import sqlite3
import time

import pytest
from tests.e2e.conftest import ServerFactory
from tests.support.server import MailServer

pytestmark = pytest.mark.e2e

DELAY = 2.0
MESSAGE = b"From: <a@example.org>\r\nTo: <postmaster@localhost>\r\nSubject: grey\r\n\r\nhello\r\n"


def attempt(server: MailServer, source: str, sender: str = "a@example.org") -> tuple[int, str]:
    """One delivery attempt as an MTA makes it: RCPT, and DATA when it was taken."""
    smtp = smtplib.SMTP(timeout=10, source_address=(source, 0), local_hostname="client.test")
    smtp.connect(server.host, server.smtp_port)
    with smtp:
        smtp.ehlo()
        smtp.mail(sender)
        code, text = smtp.rcpt("postmaster@localhost")
        if code == 250:
            code, text = smtp.data(MESSAGE)
    return code, text.decode()


def serve(mail_server: ServerFactory, **greylist: object) -> MailServer:
    return mail_server(settings={
        "trusted_networks": [],
        "checks": {"greylist": {"enabled": True, "delay": DELAY, "retry_window": 60.0} | greylist},
    })  # fmt: skip


def test_defer_then_pass_across_a_restart(mail_server: ServerFactory) -> None:
    server = serve(mail_server)
    first = time.monotonic()
    code, text = attempt(server, "127.0.0.2")
    assert code == 450 and text.startswith("4.7.1 <postmaster@localhost>: Recipient address "
                                           "rejected: Greylisted, try again in 2 seconds")
    server.wait_for_log(r"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.2\]: 450 4\.7\.1 "
                        r".*Greylisted.*; from=<a@example\.org> to=<postmaster@localhost>")
    assert attempt(server, "127.0.0.2")[0] == 450  # too early
    assert server.stop() == 0
    server.start()
    left = first + DELAY + 0.2 - time.monotonic()
    if left > 0:
        time.sleep(left)  # the delay itself: greylisting is about time passing
    code, text = attempt(server, "127.0.0.2")
    assert code == 250, text
    server.wait_for_messages("postmaster", 1)
    server.wait_for_log(r"greylist: pass: unknown\[127\.0\.0\.2\] from=<a@example\.org> "
                        r"to=<postmaster@localhost>: retried after the delay")
    # the client's network (127.0.0.0/24) is now allowed at once, for any sender
    assert attempt(server, "127.0.0.3", sender="other@example.org")[0] == 250
    with sqlite3.connect(server.state_dir / "greylist.sqlite") as db:
        assert db.execute("SELECT count(*) FROM triplets WHERE passed = 1").fetchone()[0] == 1


def test_processes_share_the_triplets(mail_server: ServerFactory) -> None:
    """With `smtp_processes = 2` each process opens the same database: whichever process takes
    the retry knows the first attempt."""
    server = mail_server(settings={
        "trusted_networks": [], "smtp_processes": 2,
        "checks": {"greylist": {"enabled": True, "delay": DELAY, "retry_window": 60.0,
                                "auto_allow_after": 0}},
    })
    first = time.monotonic()
    assert attempt(server, "127.0.0.2")[0] == 450
    time.sleep(max(0.0, first + DELAY + 0.2 - time.monotonic()))
    codes = [attempt(server, "127.0.0.2")[0] for _ in range(6)]
    assert codes == [250] * 6
    assert "Traceback" not in server.log()


def test_allow_networks_and_null_sender(mail_server: ServerFactory) -> None:
    server = serve(mail_server, allow_networks=["127.0.0.5/32"], auto_allow_after=0)
    assert attempt(server, "127.0.0.5")[0] == 250
    assert attempt(server, "127.0.0.6", sender="")[0] == 450  # bounces are greylisted too


def test_off_by_default(mail_server: ServerFactory) -> None:
    server = mail_server(settings={"trusted_networks": []})
    assert attempt(server, "127.0.0.2")[0] == 250
    assert not (server.state_dir / "greylist.sqlite").exists()
