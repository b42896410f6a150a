"""End to end: mailhaven with a real rspamd (Debian's) attached as a milter, and real clients.

A private rspamd (`tests.support.rspamd`: `rspamd_proxy` with `milter = yes`, self-scanning, no
redis, DNS to a loopback test server that knows nothing) scans what the MX listener receives.
Shown: rspamd's GTUBE test pattern is refused at end of data with rspamd's own `554 5.7.1 Gtube
pattern` and a Postfix-shaped `milter-reject` log line; a clean message is delivered with
rspamd's headers (its queue id is ours: the `i` macro), Authentication-Results right under our
Received: (rspamd inserts it at index 1, counting our trace field, as with Postfix); swaks sees
the same; a session sends two messages over one rspamd connection; and when rspamd is
stopped, `milter_default_action = "tempfail"` answers `451 4.7.1` while "accept" lets mail in.
"""

from __future__ import annotations

import smtplib
import subprocess
import uuid

import pytest
from tests.e2e.conftest import ServerFactory
from tests.fakes import free_port
from tests.support import rspamd
from tests.support.server import MailServer

pytestmark = pytest.mark.e2e


def message(body: str, subject: str = "hello") -> str:
    return (
        f"From: bob@example.com\r\nTo: alice@example.org\r\nSubject: {subject}\r\n"
        f"Date: Fri, 04 Dec 2026 12:00:00 +0000\r\nMessage-ID: <{uuid.uuid4()}@example.com>\r\n"
        f"\r\n{body}\r\n"
    )


def test_gtube_is_rejected(milter_mx: MailServer) -> None:
    with smtplib.SMTP(milter_mx.host, milter_mx.smtp_port) as client, pytest.raises(
        smtplib.SMTPDataError
    ) as err:
        client.sendmail("bob@example.com", ["alice@example.org"], message(rspamd.GTUBE))
    assert err.value.smtp_code == 554
    assert err.value.smtp_error == b"5.7.1 Gtube pattern"
    milter_mx.wait_for_log(
        r"\w+: milter-reject: END-OF-MESSAGE from \S+: 5\.7\.1 Gtube pattern; "
        r"from=<bob@example.com> to=<alice@example.org> proto=ESMTP"
    )


def test_clean_message_gets_rspamd_headers(milter_mx: MailServer) -> None:
    mark = uuid.uuid4().hex
    with smtplib.SMTP(milter_mx.host, milter_mx.smtp_port) as client:
        client.sendmail("bob@example.com", ["alice@example.org"], message(mark))
        # a second message over the same session (and the same rspamd connection)
        client.sendmail("bob@example.com", ["alice@example.org"], message(mark + "-2"))
    data = milter_mx.wait_for_mark("alice", mark + "-2")
    data = milter_mx.wait_for_mark("alice", mark)
    header = data.split(b"\r\n\r\n", 1)[0] if b"\r\n\r\n" in data else data.split(b"\n\n", 1)[0]
    lines = header.decode().splitlines()
    names = [line.split(":", 1)[0] for line in lines if line[:1] not in (" ", "\t")]
    assert "X-Spamd-Result" in names and "X-Spam-Status" in names
    # rspamd's insert at index 1 lands right under our Received: (after Return-Path and
    # Delivered-To, which local delivery adds on top)
    assert names.index("Authentication-Results") == names.index("Received") + 1
    queue_id = next(x for x in lines if x.startswith("X-Rspamd-Queue-Id:")).split()[1]
    milter_mx.wait_for_log(rf"{queue_id}: milter inet:127\.0\.0\.1:\d+: .*AddHeader=\d+")


def test_swaks_sees_the_rejection(milter_mx: MailServer, swaks: str) -> None:
    out = subprocess.run(
        [swaks, "--server", f"{milter_mx.host}:{milter_mx.smtp_port}", "--from",
         "bob@example.com", "--to", "alice@example.org", "--body", rspamd.GTUBE, "--timeout", "20"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert "<** 554 5.7.1 Gtube pattern" in out.stdout, out.stdout


@pytest.mark.parametrize(("action", "code"), [("tempfail", 451), ("accept", 250)])
def test_rspamd_down_gets_the_default_action(
    mail_server: ServerFactory, action: str, code: int
) -> None:
    dead = f"inet:127.0.0.1:{free_port()}"
    server = mail_server(
        settings={
            "local_domains": ["example.org"],
            "local_users": ["postmaster", "alice"],
            # the old top-level spelling still works, with a deprecation line in the log
            "milters": [dead],
            "milter_default_action": action,
        }
    )
    server.wait_for_log(r"warning: milters is deprecated: write it as smtpd in \[checks\.milter\]")
    with smtplib.SMTP(server.host, server.smtp_port) as client:
        client.ehlo()
        got, text = client.mail("bob@example.com")
    assert got == code, text
    if code == 451:
        assert text == b"4.7.1 Service unavailable - try again later"
        server.wait_for_log(r"milter inet:127\.0\.0\.1:\d+: connect failed")
