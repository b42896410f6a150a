"""End to end: the maillog on stderr has Postfix's shape, line by line, and pflogsumm (the
standard Postfix log summariser) counts our messages correctly from it.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from tests.e2e.conftest import ServerFactory
from tests.support.server import MailServer, RawClient

from mailhaven.proto.replies import Reply
from mailhaven.scheduler.backoff import BackoffPolicy
from mailhaven.scheduler.outcome import attempt_line, judge
from mailhaven.spool.records import DueRecipient

pytestmark = pytest.mark.e2e

QUEUED = re.compile(r"queued as ([A-Za-z0-9]+)")
CLIENT = r"unknown\[127\.0\.0\.1\]"
#: `Mon DD HH:MM:SS host mailhaven/role[pid]: text` (RFC 3164 timestamp, day padded with a space)
SYSLOG = re.compile(
    r"(?P<stamp>[A-Z][a-z]{2} [ 123]\d \d\d:\d\d:\d\d) (?P<host>\S+) "
    r"mailhaven/(?P<role>[a-z]+)\[(?P<pid>\d+)\]: (?P<text>.*)"
)


def send(server: MailServer, rcpt: str, mark: str) -> str:
    data = (
        f"From: <sender@example.org>\r\nTo: <{rcpt}>\r\nSubject: log {mark}\r\n"
        f"Message-ID: <{mark}@example.org>\r\n\r\nhello\r\n"
    ).encode()
    with smtplib.SMTP(server.host, server.smtp_port, "client.test", 10) as smtp:
        smtp.ehlo()
        smtp.mail("sender@example.org")
        smtp.rcpt(rcpt)
        code, text = smtp.data(data)
        assert code == 250, text
        match = QUEUED.search(text.decode())
        assert match
        return match.group(1)


@pytest.fixture(scope="module")
def logged(module_mail_server: ServerFactory, swaks: str) -> tuple[MailServer, dict[str, str]]:
    """Five sessions (three messages, one rejected recipient, one silent); then stopped."""
    server = module_mail_server(settings={"local_users": ["postmaster", "alice"]})
    marks = {}
    for rcpt in ("postmaster@localhost", "alice@localhost"):
        mark = uuid.uuid4().hex
        marks[send(server, rcpt, mark)] = mark
    mark = uuid.uuid4().hex
    result = subprocess.run(
        [swaks, "--server", f"{server.host}:{server.smtp_port}", "--helo", "client.test",
         "--to", "postmaster@localhost", "--from", "sender@example.org",
         "--header", f"Message-Id: <{mark}@example.org>"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
    match = QUEUED.search(result.stdout)
    assert match
    marks[match.group(1)] = mark
    with smtplib.SMTP(server.host, server.smtp_port, "client.test", 10) as smtp:
        smtp.ehlo()
        smtp.mail("sender@example.org")
        assert smtp.rcpt("nosuchuser@localhost")[0] == 550
    with RawClient(server.host, server.smtp_port) as silent:  # connects, says nothing, leaves
        assert silent.reply()[0] == 220
    for qid in marks:
        server.wait_for_log(rf"\b{qid}: removed\b")
    assert server.stop() == 0
    return server, marks


def test_postfix_shaped_lines(logged: tuple[MailServer, dict[str, str]]) -> None:
    server, marks = logged
    lines = server.log_lines()
    parsed = [m for line in lines if (m := SYSLOG.fullmatch(line))]
    # every line is syslog-shaped, except the one banner the CLI prints before logging starts
    others = [line for line in lines if not SYSLOG.fullmatch(line)]
    assert all(line.startswith("mailhaven: state directory ") for line in others), others
    assert len({m["pid"] for m in parsed}) == 1 and int(parsed[0]["pid"]) == server.pid
    texts = [(m["role"], m["text"]) for m in parsed]

    def one(role: str, pattern: str) -> re.Match[str]:
        found = [m for r, t in texts if r == role and (m := re.fullmatch(pattern, t))]
        assert len(found) == 1, (role, pattern, [t for r, t in texts if r == role])
        return found[0]

    def count(role: str, pattern: str) -> int:
        return sum(1 for r, t in texts if r == role and re.fullmatch(pattern, t))

    assert count("smtpd", rf"connect from {CLIENT}") == 5
    assert count("smtpd", rf"disconnect from {CLIENT} +commands=0") == 1
    assert (
        count("smtpd", rf"disconnect from {CLIENT} ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5")
        == 3
    )
    reject = one(
        "smtpd",
        rf"NOQUEUE: reject: RCPT from {CLIENT}: 550 5\.1\.1 (.*); from=<sender@example\.org> "
        rf"to=<nosuchuser@localhost> proto=ESMTP helo=<client\.test>",
    )
    assert "nosuchuser@localhost" in reject.group(1)
    assert (
        count("smtpd", rf"disconnect from {CLIENT} ehlo=1 mail=1 rcpt=0/1 quit=1 commands=[\d/]+")
        == 1
    )
    recipients = {}
    for qid, mark in marks.items():
        one("smtpd", rf"{qid}: client={CLIENT}")
        one("cleanup", rf"{qid}: message-id=<{mark}@example\.org>")
        size = one(
            "qmgr", rf"{qid}: from=<sender@example\.org>, size=(\d+), nrcpt=1 \(queue active\)"
        )
        assert int(size.group(1)) > 100
        sent = [
            m
            for _, t in texts
            if (
                m := re.fullmatch(
                    rf"{qid}: to=<([^>]+)>, relay=local, delay=([\d.]+), "
                    r"delays=([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+), dsn=2\.0\.0, "
                    r"status=sent \(delivered to maildir\)",
                    t,
                )
            )
        ]
        assert len(sent) == 1, [t for _, t in texts if qid in t]
        recipients[qid] = sent[0].group(1)
        one("qmgr", rf"{qid}: removed")
        # the story of one message is in order
        story = [t for _, t in texts if t.startswith(f"{qid}: ")]
        assert story[0] == f"{qid}: client=unknown[127.0.0.1]" and story[-1] == f"{qid}: removed"
    assert sorted(recipients.values()) == [
        "alice@localhost",
        "postmaster@localhost",
        "postmaster@localhost",
    ]


def test_pflogsumm_counts(logged: tuple[MailServer, dict[str, str]], pflogsumm: str) -> None:
    server, _marks = logged
    result = subprocess.run(
        [pflogsumm, "--syslog-name=mailhaven", str(server.log_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = result.stdout

    def total(label: str) -> int:
        match = re.search(rf"^\s+(\d+)\s+{label}\b", report, re.M)
        assert match, (label, report[:1500])
        return int(match.group(1))

    assert total("delivered") == 3
    assert total("rejected") == 1
    assert total("bounced") == 0
    assert total("deferred") == 0
    assert total("sending hosts/domains") == 1
    assert total("recipients") == 2
    assert re.search(r"^\s+3\s+\d+\s+0\s+[\d.]+ s\s+[\d.]+ s\s+localhost$", report, re.M), report


def pflogsumm_total(pflogsumm: str, server: MailServer, label: str) -> int:
    result = subprocess.run(
        [pflogsumm, "--syslog-name=mailhaven", str(server.log_path)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    match = re.search(rf"^\s+(\d+)\s+{label}\b", result.stdout, re.M)
    assert match, result.stdout
    return int(match.group(1))


# Postfix's smtpd gives a transaction its queue id, and logs `<QID>: client=`, at the first
# *accepted* RCPT; a session whose recipients are all refused logs only `NOQUEUE: reject`.
# pflogsumm counts `client=` lines as "received", so logging it at MAIL time over-counts.


def test_no_client_line_without_an_accepted_recipient(
    logged: tuple[MailServer, dict[str, str]],
) -> None:
    server, marks = logged
    clients = re.findall(r"smtpd\[\d+\]: (\w+): client=", server.log())
    assert sorted(clients) == sorted(marks)


def test_pflogsumm_received_count(
    logged: tuple[MailServer, dict[str, str]], pflogsumm: str
) -> None:
    server, _marks = logged
    assert pflogsumm_total(pflogsumm, server, "received") == 3


def test_disconnect_line_counts_like_postfix(logged: tuple[MailServer, dict[str, str]]) -> None:
    server, _marks = logged
    log = server.log()
    assert "disconnect from unknown[127.0.0.1] ehlo=1 mail=1 rcpt=0/1 quit=1 commands=3/4\n" in log
    assert "disconnect from unknown[127.0.0.1] commands=0\n" in log


def test_pflogsumm_reads_remote_delivery_lines(pflogsumm: str, tmp_path: Path) -> None:
    """The remote shapes (`250 2.0.0 ...`, `host H said: ...`) and our own (`connect to ...`),
    written by the real formatter, are counted and explained by pflogsumm as Postfix's are."""
    relay = "mx.x.example[192.0.2.1]:25"
    said = {
        "ok@x.example": (Reply(250, "Ok: queued as 77AB", "2.0.0"), "end of DATA"),
        "bob@x.example": (Reply(550, "<bob@x.example>: User unknown", "5.1.1"), "RCPT TO"),
        "later@x.example": (Reply(450, "Mailbox busy", "4.2.1"), "RCPT TO"),
    }
    replies = {a: replace(r, answered=cmd) for a, (r, cmd) in said.items()}
    replies["far@y.example"] = Reply(421, "connect to mx.y.example[192.0.2.2]:25: refused", "4.4.1")
    due = [DueRecipient("4Xk9Q1", i, a, a, 0, 1000.0, 1000.0) for i, a in enumerate(replies)]
    verdicts = judge(due, replies, policy=BackoffPolicy(), now=1001.0, null_sender=False)
    log = tmp_path / "maillog"
    log.write_text("".join(
        f"Dec  2 07:08:41 h mailhaven/smtp[42]: "
        f"{attempt_line('4Xk9Q1', v, relay=relay, now=1001.0, delays=(1, 0, 0, 0))}\n"
        for v in verdicts
    ))  # fmt: skip
    report = subprocess.run(
        [pflogsumm, "--syslog-name=mailhaven", str(log)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    for label in ["delivered", "bounced", r"deferred\s+\(2\s+deferrals\)"]:  # one message
        assert re.search(rf"^\s+1\s+{label}", report, re.M), (label, report)
    bounces = report.partition("message bounce detail (by relay)")[2]
    assert re.search(rf"{re.escape(relay)} \(total: 1\)\s+1\s+.*User unknown", bounces), report
    deferrals = report.partition("message deferral detail")[2]
    assert "Mailbox busy" in deferrals and "refused" in deferrals, report


def test_log_file_target_rotates_on_sigusr1_and_pflogsumm_reads_it(
    mail_server: ServerFactory, pflogsumm: str, tmp_path: Path
) -> None:
    # logrotate's way: rename the file, then SIGUSR1; every line is in one of the two files.
    path = tmp_path / "maillog"
    server = mail_server(settings={"local_users": ["postmaster"], "log": f"file:{path}"})
    first = send(server, "postmaster@localhost", uuid.uuid4().hex)
    rotated = tmp_path / "maillog.1"

    def wait_in(where: Path, pattern: str) -> None:
        for _ in range(200):
            if where.exists() and re.search(pattern, where.read_text()):
                return
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not in {where}")

    wait_in(path, rf"{first}: removed")
    path.rename(rotated)
    server.signal(signal.SIGUSR1)
    second = send(server, "postmaster@localhost", uuid.uuid4().hex)
    wait_in(path, rf"{second}: removed")
    assert server.stop() == 0
    old, new = rotated.read_text(), path.read_text()
    assert f"{first}: client=" in old and second not in old
    assert f"{second}: client=" in new and first not in new
    assert "Traceback" not in server.log()  # stderr: nothing but what precedes setup
    for text, received in ((old, 1), (new, 1), (old + new, 2)):
        joined = tmp_path / "joined"
        joined.write_text(text)
        report = subprocess.run(
            [pflogsumm, "--syslog-name=mailhaven", str(joined)],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        assert re.search(rf"^\s+{received}\s+received\b", report, re.M), report
        assert re.search(rf"^\s+{received}\s+delivered\b", report, re.M), report


def test_syslog_target_sends_mail_facility_lines(
    mail_server: ServerFactory, tmp_path: Path
) -> None:
    path = tmp_path / "log.sock"
    syslogd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslogd.bind(str(path))
    syslogd.settimeout(10)
    lines: list[str] = []

    def read() -> None:  # a syslogd reads all the time: the socket's queue is short
        with contextlib.suppress(OSError):
            while not any(": removed" in line for line in lines):
                lines.append(syslogd.recv(8192).decode())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        server = mail_server(settings={"local_users": ["postmaster"], "log": f"syslog:{path}"})
        qid = send(server, "postmaster@localhost", uuid.uuid4().hex)
        reader.join(20)
        assert any(f"{qid}: removed" in line for line in lines)
        assert server.stop() == 0
    finally:
        syslogd.close()
        reader.join(5)
    shape = re.compile(r"<(\d+)>[A-Z][a-z]{2} [ 123]\d \d\d:\d\d:\d\d mailhaven/([a-z]+)\[\d+\]: ")
    for line in lines:
        match = shape.match(line)
        assert match, line
        assert int(match.group(1)) // 8 == 2, line  # facility mail
    roles = {shape.match(line).group(2) for line in lines}  # type: ignore[union-attr]
    assert {"smtpd", "cleanup", "qmgr"} <= roles, roles


F2B = Path(__file__).parents[2] / ".tools" / "fail2ban"


def test_fail2bans_postfix_filter_bans_what_we_reject(mail_server: ServerFactory) -> None:
    """fail2ban's own postfix filter (its aggressive mode: rejects, SASL failures, sessions
    that failed AUTH) matches our lines once its `_daemon` names us, as a jail would set it:
    `filter = postfix[mode=aggressive, _daemon="mailhaven/\\w+"]`."""
    regex = F2B / "usr" / "bin" / "fail2ban-regex"
    if not regex.exists():
        pytest.skip("fail2ban is not unpacked (scripts/install-test-deps)")
    server = mail_server(settings={"local_users": ["postmaster"], "trusted_networks": []},
                         services=("smtp", "submission"))
    with smtplib.SMTP(server.host, server.smtp_port, "client.test", 10) as smtp:
        smtp.ehlo()
        smtp.mail("a@example.org")
        assert smtp.rcpt("nosuch@localhost")[0] == 550
        assert smtp.rcpt("x@remote.example")[0] == 554
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # self-signed
    with smtplib.SMTP(server.host, server.port("submission"), "client.test", 10) as smtp:
        smtp.starttls(context=context)
        smtp.ehlo()
        token = base64.b64encode(b"\0bob\0wrong").decode()
        assert smtp.docmd("AUTH", f"PLAIN {token}")[0] == 535
    server.wait_for_log(r"SASL PLAIN authentication failed")
    assert server.stop() == 0
    flt = F2B / "etc" / "fail2ban" / "filter.d" / "postfix.conf"
    result = subprocess.run(
        [sys.executable, str(regex), "--out", "msg", str(server.log_path),
         f'{flt}[mode=aggressive, _daemon="mailhaven/\\w+"]'],
        env={**os.environ, "PYTHONPATH": str(F2B / "usr" / "lib" / "python3" / "dist-packages")},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    matched = result.stdout.splitlines()
    assert any("RCPT from unknown[127.0.0.1]: 550 5.1.1" in line for line in matched), matched
    assert any("Relay access denied" in line for line in matched), matched
    assert any("SASL PLAIN authentication failed" in line for line in matched), matched
    assert all("[127.0.0.1]" in line for line in matched), matched
