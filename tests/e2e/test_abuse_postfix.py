"""End to end with a real MTA: Postfix relaying to a greylisting mailhaven retries on its own
and its mail gets through once the delay has passed (RFC 6647's premise: real MTAs retry).

    smtplib -> Postfix (private instance, relayhost = mailhaven, retries every 1-2 s)
            -> mailhaven (greylisting, delay 2 s, no trusted networks) -> postmaster's Maildir
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest
from tests.e2e.conftest import ServerFactory
from tests.support.postfix import postfix_instance

pytestmark = pytest.mark.e2e

MESSAGE = b"From: <someone@pf.test>\r\nTo: <postmaster@localhost>\r\nSubject: grey\r\n\r\nhi\r\n"


def test_postfix_retries_past_the_greylist(mail_server: ServerFactory, tmp_path: Path) -> None:
    server = mail_server(settings={
        "trusted_networks": [],
        "checks": {"greylist": {"enabled": True, "delay": 2.0, "retry_window": 60.0}},
    })
    with postfix_instance(keep=tmp_path, relayhost=f"[127.0.0.1]:{server.smtp_port}") as pf:
        with smtplib.SMTP(pf.host, pf.port, timeout=10) as smtp:
            assert smtp.sendmail("someone@pf.test", ["postmaster@localhost"], MESSAGE) == {}
        pf.wait_for_log(r"status=deferred .*450 4\.7\.1 <postmaster@localhost>: Recipient "
                        r"address rejected: Greylisted", timeout=20)
        [path] = server.wait_for_messages("postmaster", 1, timeout=30)
        assert b"Subject: grey" in path.read_bytes()
        pf.wait_for_log(r"to=<postmaster@localhost>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, "
                        r".*status=sent", timeout=20)
    server.wait_for_log(r"NOQUEUE: reject: RCPT from \S+\[127\.0\.0\.1\]: 450 4\.7\.1 .*Greylisted")
    server.wait_for_log(r"greylist: pass: .*from=<someone@pf\.test> to=<postmaster@localhost>")
