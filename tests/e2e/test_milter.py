"""End to end: every milter action and every way a milter can fail, through a real server.

A real `mailhaven serve` (MX listener, `milters = [<test milter>]`, `milter_content_timeout = 1`,
`limits.message_size` 1 MiB) and `tests.support.milter.TestMilter`, whose replies each test
sets. Clients are smtplib and swaks. Shown: a per-recipient RCPT refusal with the milter's own
text; header/body/envelope edits visible in the delivered copy; quarantine holds the message
(`mailq` shows `!`); discard answers 250 and delivers nothing; a milter that closes
mid-message, answers garbage, stalls past the timeout, or floods a 100 MiB replacement body is
answered `451 4.7.1` (milter_default_action = tempfail) within the timeout, nothing is queued,
the server stays up and the next session works. Log lines have Postfix's shape.
"""

from __future__ import annotations

import smtplib
import subprocess
import sys
import time
import uuid

import pytest
from tests.e2e.conftest import ServerFactory
from tests.support import milter as tm
from tests.support.milter import TestMilter
from tests.support.server import MailServer

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("fresh_script")]


@pytest.fixture(scope="module")
def server(milter: TestMilter, module_mail_server: ServerFactory) -> MailServer:
    return module_mail_server(
        settings={
            "local_domains": ["example.org"],
            "local_users": ["postmaster", "alice", "bob", "carol"],
            "checks": {"milter": {
                "smtpd": [milter.spec], "content_timeout": 1.0, "command_timeout": 1.0,
                "quarantine": "hold",
            }},
            "limits": {"message_size": 1024 * 1024},
        }
    )


def message(mark: str, subject: str = "hello") -> str:
    return (
        f"From: x@example.com\r\nTo: alice@example.org\r\nSubject: {subject}\r\n"
        f"Message-ID: <{mark}@example.com>\r\n\r\nbody {mark}\r\n"
    )


def send(server: MailServer, mark: str, rcpts: list[str] | None = None) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP(server.host, server.smtp_port, timeout=30) as client:
        return client.sendmail("x@example.com", rcpts or ["alice@example.org"], message(mark))


def test_rcpt_refused_per_recipient(server: MailServer, milter: TestMilter) -> None:
    def rcpt(data: bytes) -> list[bytes]:
        return [tm.replycode("550 5.7.1 bob does not want it")] if b"bob@" in data else [tm.cont()]

    milter.replies["R"] = rcpt
    mark = uuid.uuid4().hex
    refused = send(server, mark, ["alice@example.org", "bob@example.org"])
    assert refused == {"bob@example.org": (550, b"5.7.1 bob does not want it")}
    server.wait_for_mark("alice", mark)
    server.wait_for_log(
        r"\w+: milter-reject: RCPT from \S+: 550 5\.7\.1 bob does not want it; "
        r"from=<x@example.com> to=<bob@example.org> proto=ESMTP helo=<"
    )


def test_every_edit_reaches_the_delivered_copy(server: MailServer, milter: TestMilter) -> None:
    milter.replies["E"] = [
        tm.progress(),
        tm.add_header("X-Scanned", "yes"),
        tm.insert_header(1, "X-First", "top"),
        tm.change_header(1, "Subject", "[scanned] hello"),
        tm.replace_body(b"replaced body\r\n"),
        tm.change_from("new-sender@example.org"),
        tm.add_rcpt("carol@example.org"),
        tm.del_rcpt("alice@example.org"),
        tm.cont(),
    ]
    mark = uuid.uuid4().hex
    assert send(server, mark) == {}
    data = server.wait_for_mark("carol", f"<{mark}@example.com>").replace(b"\r\n", b"\n")
    head, _, body = data.partition(b"\n\n")
    assert body == b"replaced body\n"
    assert b"Return-Path: <new-sender@example.org>" in head
    assert b"Subject: [scanned] hello\n" in head and head.endswith(b"X-Scanned: yes")
    lines = head.decode().splitlines()
    received = next(i for i, line in enumerate(lines) if line.startswith("Received:"))
    assert lines[received + 3] == "X-First: top"  # right under our folded Received:
    assert not any(mark in p.read_text() for p in server.messages("alice"))


def test_quarantine_holds_the_message(server: MailServer, milter: TestMilter) -> None:
    milter.replies["E"] = [tm.quarantine("suspicious attachment"), tm.cont()]
    mark = uuid.uuid4().hex
    assert send(server, mark) == {}
    (match,) = server.wait_for_log(r"(\w+): milter-hold: suspicious attachment")
    queue_id = match.group(1)
    out = subprocess.run(
        [sys.executable, "-m", "mailhaven", "mailq", "-c", str(server.dir / "mailhaven.toml")],
        capture_output=True, text=True, timeout=30, check=False, cwd=server.dir,
    )
    assert f"{queue_id}!" in out.stdout, out.stdout + out.stderr


def test_quarantine_files_into_junk_by_default(mail_server: ServerFactory, milter: TestMilter) -> None:
    """Without `quarantine = "hold"` a quarantined message reaches the recipient's Junk."""
    server = mail_server(settings={
        "local_domains": ["example.org"], "local_users": ["postmaster", "alice"],
        "checks": {"milter": {"smtpd": [milter.spec]}},
    })
    milter.replies["E"] = [tm.quarantine("suspicious attachment"), tm.cont()]
    mark = uuid.uuid4().hex
    assert send(server, mark) == {}
    server.wait_for_log(r"\w+: milter-junk: quarantine: suspicious attachment")
    junk = server.maildir("alice") / ".Junk" / "new"
    deadline = time.monotonic() + 10
    while not any(mark in p.read_text() for p in junk.glob("*")):
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.05)
    assert not any(mark in p.read_text() for p in server.messages("alice"))


def test_discard_answers_250_and_delivers_nothing(server: MailServer, milter: TestMilter) -> None:
    milter.replies["E"] = [tm.discard()]
    mark = uuid.uuid4().hex
    assert send(server, mark) == {}
    server.wait_for_log(r"\w+: milter-discard: END-OF-MESSAGE from \S+: milter triggers DISCARD action")
    time.sleep(0.5)
    assert not any(mark in p.read_text() for p in server.messages("alice"))


@pytest.mark.parametrize("failure", ["close", "garbage", "stall", "flood"])
def test_broken_milter_is_a_tempfail(server: MailServer, milter: TestMilter, failure: str) -> None:
    flood = [tm.replace_body(b"z" * 65535)] * 1600 + [tm.cont()]  # 100 MiB
    milter.replies["E"] = {"close": tm.CLOSE, "garbage": tm.GARBAGE, "stall": tm.STALL,
                           "flood": flood}[failure]
    mark = uuid.uuid4().hex
    started = time.monotonic()
    with pytest.raises(smtplib.SMTPDataError) as err:
        send(server, mark)
    assert time.monotonic() - started < 10
    assert (err.value.smtp_code, err.value.smtp_error) == (
        451, b"4.7.1 Service unavailable - try again later"
    )
    server.wait_for_log(r"warning: milter inet:127\.0\.0\.1:\d+: .*; default action tempfail")
    # a new session gets a new milter connection and works
    milter.replies.clear()
    mark = uuid.uuid4().hex
    assert send(server, mark) == {}
    server.wait_for_mark("alice", mark)


def test_swaks_through_a_header_adding_milter(server: MailServer, milter: TestMilter, swaks: str) -> None:
    milter.replies["E"] = [tm.add_header("X-Milter", "swaks"), tm.cont()]
    mark = uuid.uuid4().hex
    out = subprocess.run(
        [swaks, "--server", f"{server.host}:{server.smtp_port}", "--from", "x@example.com",
         "--to", "alice@example.org", "--header", f"Subject: {mark}", "--timeout", "20"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert "<-  250 2.0.0 Ok: queued as" in out.stdout, out.stdout
    assert b"X-Milter: swaks" in server.wait_for_mark("alice", mark)
