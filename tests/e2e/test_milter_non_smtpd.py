"""End to end: `[checks.milter] non_smtpd` (Postfix's non_smtpd_milters) on `mailhaven sendmail`.

`mailhaven sendmail` drops the message, the pickup shows it to the milters as a session from
localhost [127.0.0.1], then queues it. Shown with the scriptable TestMilter: a header edit
reaches the delivered copy; a 5xx moves the drop file to `maildrop/corrupt/` (nothing
delivered, a milter-reject line); a milter that is down keeps the drop file for a later try
(default action tempfail). With a real OpenDKIM (Debian's) the cron-style mail is signed and
the signature verifies with dkimpy.
"""

from __future__ import annotations

import time
import uuid

import dkim
import pytest
from tests.e2e.conftest import ServerFactory
from tests.e2e.test_sendmail_e2e import drop_files, sendmail
from tests.support import milter as tm
from tests.support import opendkim
from tests.support.milter import TestMilter
from tests.support.server import MailServer

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("fresh_script")]


@pytest.fixture(scope="module")
def server(milter: TestMilter, module_mail_server: ServerFactory) -> MailServer:
    return module_mail_server(settings={
        "local_domains": ["example.org"], "local_users": ["postmaster", "alice"],
        "checks": {"milter": {"non_smtpd": [milter.spec], "content_timeout": 2.0,
                              "command_timeout": 2.0}},
    })


def message(mark: str) -> bytes:
    return (f"From: cron@example.org\nTo: alice@example.org\nSubject: report {mark}\n"
            f"Message-ID: <{mark}@example.org>\n\nall fine {mark}\n").encode()


def test_a_milter_edit_reaches_the_delivered_copy(server: MailServer, milter: TestMilter) -> None:
    milter.replies["E"] = [tm.add_header("X-Outbound-Scan", "clean"), tm.cont()]
    mark = uuid.uuid4().hex
    done = sendmail(server, "-t", "-i", stdin=message(mark))
    assert done.returncode == 0, done.stderr
    data = server.wait_for_mark("alice", mark, timeout=20)
    assert b"X-Outbound-Scan: clean" in data
    connects = milter.seen("C")
    assert connects and connects[-1].startswith(b"localhost\x004")


def test_a_refused_message_is_set_aside(server: MailServer, milter: TestMilter) -> None:
    milter.replies["E"] = [tm.replycode("550 5.7.1 outbound spam")]
    mark = uuid.uuid4().hex
    assert sendmail(server, "-t", "-i", stdin=message(mark)).returncode == 0
    server.wait_for_log(r"\w+: milter-reject: END-OF-MESSAGE from local: 550 5\.7\.1 outbound spam; "
                        r"from=<\S*> to=<alice@example.org>")
    server.wait_for_log(r"moved to \S+corrupt: refused: 550 outbound spam")
    corrupt = server.state_dir / "maildrop" / "corrupt"
    assert any(mark.encode() in p.read_bytes() for p in corrupt.iterdir())
    assert not any(mark in p.read_text() for p in server.messages("alice"))


def test_a_dead_milter_keeps_the_drop_file(
    mail_server: ServerFactory,
) -> None:
    with TestMilter() as gone:
        spec = gone.spec
    server = mail_server(settings={
        "local_domains": ["example.org"], "local_users": ["postmaster", "alice"],
        "checks": {"milter": {"non_smtpd": [spec]}},
    })
    mark = uuid.uuid4().hex
    assert sendmail(server, "-t", "-i", stdin=message(mark)).returncode == 0
    server.wait_for_log(r"not collected now: 451 4\.7\.1 Service unavailable")
    assert any(mark.encode() in p.read_bytes() for p in drop_files(server))
    assert server.messages("alice") == []


def test_opendkim_signs_local_mail(
    mail_server: ServerFactory, signer: opendkim.OpenDKIMInstance
) -> None:
    server = mail_server(settings={
        "local_domains": ["example.org"], "local_users": ["postmaster", "alice"],
        "checks": {"milter": {"non_smtpd": [signer.spec]}},
    })
    mark = uuid.uuid4().hex
    text = (f"From: cron@example.org\nTo: alice@example.org\nSubject: nightly {mark}\n"
            f"Date: Fri, 04 Dec 2026 12:00:00 +0000\nMessage-ID: <{mark}@example.org>\n\n"
            f"backup done {mark}\n").encode()
    assert sendmail(server, "-t", "-i", "-f", "cron@example.org", stdin=text).returncode == 0
    data = server.wait_for_mark("alice", mark, timeout=20)
    assert b"d=example.org; s=test;" in data

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"test._domainkey.example.org."
        return signer.txt_record

    assert dkim.verify(data, dnsfunc=dnsfunc)
    server.wait_for_log(rf": milter inet:127\.0\.0\.1:{signer.port}: InsertHeader=1")
    deadline = time.monotonic() + 5
    while drop_files(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert drop_files(server) == []
