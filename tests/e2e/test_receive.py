"""End to end: receiving mail over real loopback sockets with real clients (smtplib, swaks and
byte-exact socket scripts) against a real `mailhaven serve` process.

Most tests share one server (`server`, one per module) and each uses its own recipients or
unique markers, so they do not see each other's mail. Tests that need another configuration
(no trusted networks, greet_pause, a per-IP connection limit, a large message size) start their
own server, which costs ~0.2 s.
"""

from __future__ import annotations

import concurrent.futures
import email.policy
import email.utils
import hashlib
import os
import re
import shutil
import smtplib
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from tests.e2e.conftest import ServerFactory
from tests.support.server import (
    MailServer,
    RawClient,
    free_port,
    merge,
    queue_id_of,
    split_trace,
    to_lf,
)

pytestmark = pytest.mark.e2e

MESSAGE_SIZE = 1024 * 1024
HARD_ERROR_LIMIT = 10
USERS = ["postmaster", "alice", "bob", "carol", "dave", "erin", "frank", "load"]
MAIN_SETTINGS = {
    "local_users": USERS,
    "aliases": {"team": ["alice", "bob"]},
    "limits": {
        "recipients": 100,
        "message_size": MESSAGE_SIZE,
        "connections_per_ip": 200,
        "hard_error_limit": HARD_ERROR_LIMIT,
        "soft_error_limit": 8,
        "error_sleep": 0.05,
    },
}
QUEUED = re.compile(r"Ok: queued as ([A-Za-z0-9]+)")


@pytest.fixture(scope="module")
def server(module_mail_server: ServerFactory) -> MailServer:
    # mail for remote.example goes to a closed loopback port: it is deferred, never sent
    closed = {"relay": {"transport": {"remote.example": f"[127.0.0.1]:{free_port()}"}}}
    return module_mail_server(settings=merge(MAIN_SETTINGS, closed))


# ---------------------------------------------------------------------- helpers


def marker() -> str:
    return uuid.uuid4().hex


def make_message(mark: str, *, to: str = "postmaster@localhost", body: str | None = None) -> bytes:
    """A well-formed RFC 5322 message with CRLF line ends and a unique Message-ID."""
    text = (
        f"From: Sender <sender@example.org>\r\n"
        f"To: <{to}>\r\n"
        f"Subject: test {mark}\r\n"
        f"Date: {email.utils.formatdate()}\r\n"
        f"Message-ID: <{mark}@example.org>\r\n"
        f"\r\n"
    )
    text += body if body is not None else f"Hello, {mark}.\r\n"
    return text.encode("utf-8")


def send(
    server: MailServer,
    sender: str,
    recipients: list[str],
    message: bytes,
    *,
    mail_options: list[str] | None = None,
    rcpt_options: list[str] | None = None,
    helo: str = "client.test",
) -> str:
    """Send one message with smtplib; return the queue id from the 250 reply to DATA."""
    with smtplib.SMTP(server.host, server.smtp_port, local_hostname=helo, timeout=30) as smtp:
        return send_on(smtp, sender, recipients, message, mail_options, rcpt_options)


def send_on(
    smtp: smtplib.SMTP,
    sender: str,
    recipients: list[str],
    message: bytes,
    mail_options: list[str] | None = None,
    rcpt_options: list[str] | None = None,
) -> str:
    smtp.ehlo_or_helo_if_needed()
    code, text = smtp.mail(sender, mail_options or [])
    assert code == 250, (code, text)
    for rcpt in recipients:
        code, text = smtp.rcpt(rcpt, rcpt_options or [])
        assert code == 250, (rcpt, code, text)
    code, text = smtp.data(message)
    assert code == 250, (code, text)
    match = QUEUED.search(text.decode())
    assert match, text
    return match.group(1)


def wait_for_qid(server: MailServer, user: str, qid: str, *, timeout: float = 10.0) -> bytes:
    """The content of `user`'s copy of message `qid`, once it is delivered."""
    deadline = time.monotonic() + timeout
    while True:
        for path in server.messages(user):
            data = path.read_bytes()
            if queue_id_of(data) == qid:
                return data
        if time.monotonic() > deadline:
            raise AssertionError(f"{qid} not delivered to {user}\n{server.log_tail()}")
        time.sleep(0.02)


def copies(server: MailServer, user: str, qid: str) -> int:
    return sum(1 for p in server.messages(user) if queue_id_of(p.read_bytes()) == qid)


def wait_removed(server: MailServer, qid: str) -> None:
    """Wait until the queue has finished with `qid` (every recipient done)."""
    server.wait_for_log(rf"\b{qid}: removed\b")


def check_received(field: bytes, *, qid: str, helo: str, protocol: str, rcpt: str | None) -> None:
    """Our trace field: `Received: from HELO (unknown [127.0.0.1]) by mx.test (mailhaven)
    with PROTO id QID [for <rcpt>]; DATE`, the date recent and RFC 5322-valid."""
    text = field.decode("utf-8")
    for_part = rf" for <{re.escape(rcpt)}>" if rcpt else ""
    pattern = (
        rf"Received: from {re.escape(helo)} \(unknown \[127\.0\.0\.1\]\) by mx\.test \(mailhaven\)"
        rf" with {protocol} id {qid}{for_part}; (?P<date>.+)"
    )
    match = re.fullmatch(pattern, text)
    assert match, text
    stamp = email.utils.parsedate_to_datetime(match.group("date"))
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 120


def body_of(data: bytes) -> bytes:
    """A delivered copy without its three trace fields."""
    return split_trace(data)[1]


def assert_still_serving(server: MailServer) -> None:
    """A fresh, ordinary smtplib session is accepted and delivered."""
    mark = marker()
    qid = send(server, "probe@example.org", ["frank@localhost"], make_message(mark))
    assert mark.encode() in wait_for_qid(server, "frank", qid)


def all_mail(server: MailServer) -> bytes:
    root = server.state_dir / "mail"
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


def session(server: MailServer, *, ehlo: str = "EHLO client.test") -> RawClient:
    client = RawClient(server.host, server.smtp_port)
    code, _ = client.reply()
    assert code == 220
    if ehlo:
        code, _ = client.command(ehlo)
        assert code == 250
    return client


def swaks_run(swaks: str, server: MailServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [swaks, "--server", f"{server.host}:{server.smtp_port}", "--helo", "client.test", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


# ---------------------------------------------------------------------- 1. smtplib


def test_smtplib_message_is_stored_as_sent(server: MailServer) -> None:
    mark = marker()
    body = (
        "First line.\r\n"
        ".A line that starts with a dot (smtplib dot-stuffs it).\r\n"
        ".\r\n"
        "..\r\n"
        "Trailing spaces and a tab:   \t\r\n"
        "\r\n"
        + "x" * 990
        + "\r\n"
        + "From the start of a line, not mbox-escaped.\r\n"
        + "Last line.\r\n"
    )
    message = make_message(mark, body=body)
    qid = send(server, "sender@example.org", ["postmaster@localhost"], message)
    data = wait_for_qid(server, "postmaster", qid)
    (return_path, delivered_to, received), rest = split_trace(data)
    assert return_path == b"Return-Path: <sender@example.org>"
    assert delivered_to == b"Delivered-To: postmaster@localhost"
    check_received(
        received, qid=qid, helo="client.test", protocol="ESMTP", rcpt="postmaster@localhost"
    )
    assert rest == to_lf(message)
    assert b"\r" not in data


def test_a_message_without_headers_gets_its_separator(server: MailServer) -> None:
    """Issue 16 #1: `DATA` then `look ma no headers!` must not make the body line a header."""
    mark = marker()
    message = f"look ma no headers! {mark}\r\n".encode()
    qid = send(server, "sender@example.org", ["postmaster@localhost"], message)
    data = wait_for_qid(server, "postmaster", qid)
    _, rest = split_trace(data)
    assert rest == b"\n" + to_lf(message)  # the empty line, then the body as sent
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert parsed.defects == [] and parsed.get_content() == to_lf(message).decode()


def test_alias_and_several_recipients_each_get_one_copy(server: MailServer) -> None:
    mark = marker()
    message = make_message(mark, to="team@localhost")
    rcpts = ["postmaster@localhost", "team@localhost", "carol@localhost", "Alice@localhost"]
    qid = send(server, "sender@example.org", rcpts, message)
    wait_removed(server, qid)
    for user in ("postmaster", "alice", "bob", "carol"):
        data = wait_for_qid(server, user, qid)
        (return_path, delivered_to, received), rest = split_trace(data)
        assert return_path == b"Return-Path: <sender@example.org>"
        assert re.fullmatch(rb"Delivered-To: " + user.encode() + rb"@localhost", delivered_to, re.I)
        # several recipients: the Received: field names none of them
        check_received(received, qid=qid, helo="client.test", protocol="ESMTP", rcpt=None)
        assert rest == to_lf(message)
        assert copies(server, user, qid) == 1, user


def test_smtputf8_and_8bitmime(server: MailServer) -> None:
    mark = marker()
    message = (
        "From: Jörg Grüße <jörg@bücher.example>\r\n"
        "To: carol@localhost\r\n"
        f"Subject: Grüße {mark} — ünïcödé ✓\r\n"
        f"Message-ID: <{mark}@bücher.example>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Ein 8-Bit-Text: äöüß €, 日本語, emoji 📬.\r\n"
    ).encode()
    qid = send(
        server,
        "jörg@bücher.example",
        ["carol@localhost"],
        message,
        mail_options=["SMTPUTF8", "BODY=8BITMIME"],
    )
    data = wait_for_qid(server, "carol", qid)
    (return_path, _delivered_to, received), rest = split_trace(data)
    assert return_path == "Return-Path: <jörg@bücher.example>".encode()
    check_received(
        received, qid=qid, helo="client.test", protocol="UTF8SMTP", rcpt="carol@localhost"
    )
    assert rest == to_lf(message)


def test_dsn_parameters_are_accepted(server: MailServer) -> None:
    mark = marker()
    message = make_message(mark, to="carol@localhost")
    qid = send(
        server,
        "dave@localhost",  # a local sender: a success DSN, if one is sent, stays on loopback
        ["carol@localhost"],
        message,
        mail_options=["RET=HDRS", f"ENVID={mark}"],
        rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;a@b"],
    )
    assert body_of(wait_for_qid(server, "carol", qid)) == to_lf(message)


# ---------------------------------------------------------------------- 2. swaks


def test_swaks_plain_session(server: MailServer, swaks: str) -> None:
    mark = marker()
    result = swaks_run(
        swaks, server, "--to", "dave@localhost", "--from", "x@example.org",
        "--header", f"Subject: swaks {mark}", "--body", f"body {mark}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    qid = QUEUED.search(result.stdout)
    assert qid, result.stdout
    data = wait_for_qid(server, "dave", qid.group(1))
    assert f"Subject: swaks {mark}".encode() in data
    assert f"body {mark}".encode() in data


def test_swaks_pipelined_session(server: MailServer, swaks: str) -> None:
    mark = marker()
    result = swaks_run(
        swaks, server, "--pipeline", "--to", "dave@localhost,team@localhost",
        "--from", "x@example.org", "--header", f"Subject: pipelined {mark}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    # swaks really pipelined: MAIL, both RCPTs and DATA went out before the first reply came
    assert re.search(
        r" -> MAIL FROM.*\n -> RCPT TO.*\n -> RCPT TO.*\n -> DATA\n<-  250", result.stdout
    )
    qid = QUEUED.search(result.stdout)
    assert qid, result.stdout
    for user in ("dave", "alice", "bob"):
        assert f"pipelined {mark}".encode() in wait_for_qid(server, user, qid.group(1))


def test_bdat_chunks(server: MailServer) -> None:
    mark = marker()
    chunks = [
        f"Subject: bdat {mark}\r\nMessage-ID: <{mark}@example.org>\r\n\r\n".encode(),
        b"A line\r\n.\r\n..dots are not stuffed in BDAT\r\n",
        b"a CR at the end of a chunk\r",  # the LF comes in the next chunk: still a CRLF
        b"\nend\r\n",
    ]
    with session(server) as client:
        assert client.command("MAIL FROM:<x@example.org>")[0] == 250
        assert client.command("RCPT TO:<erin@localhost>")[0] == 250
        total = 0
        for chunk in chunks:
            client.send(f"BDAT {len(chunk)}\r\n".encode() + chunk)
            total += len(chunk)
            code, text = client.reply()
            assert (code, text) == (250, [f"2.0.0 Ok: {total} octets received"])
        code, text = client.command("BDAT 0 LAST")
        assert code == 250, text
        qid = QUEUED.search(text[0])
        assert qid
        assert client.command("QUIT")[0] == 221
    data = wait_for_qid(server, "erin", qid.group(1))
    assert body_of(data) == to_lf(b"".join(chunks))


def test_bdat_pipelined(server: MailServer) -> None:
    mark = marker()
    one = f"Subject: pipelined bdat {mark}\r\n\r\nfirst chunk\r\n".encode()
    two = b"second chunk\r\n.\r\n"
    wire = (
        b"MAIL FROM:<x@example.org>\r\nRCPT TO:<erin@localhost>\r\n"
        + f"BDAT {len(one)}\r\n".encode() + one
        + f"BDAT {len(two)} LAST\r\n".encode() + two
        + b"MAIL FROM:<y@example.org>\r\nRCPT TO:<erin@localhost>\r\n"
        + f"BDAT {len(one)} LAST\r\n".encode() + one
        + b"QUIT\r\n"
    )  # fmt: skip
    with session(server) as client:
        client.send(wire)
        replies = client.replies(8)
    codes = [code for code, _ in replies]
    assert codes == [250, 250, 250, 250, 250, 250, 250, 221], replies
    first = QUEUED.search(replies[3][1][0])
    second = QUEUED.search(replies[6][1][0])
    assert first and second
    assert body_of(wait_for_qid(server, "erin", first.group(1))) == to_lf(one + two)
    assert body_of(wait_for_qid(server, "erin", second.group(1))) == to_lf(one)


def test_swaks_unknown_user_is_refused(server: MailServer, swaks: str) -> None:
    result = swaks_run(
        swaks, server, "--quit-after", "RCPT", "--to", "nosuchuser@localhost",
        "--from", "x@example.org",
    )  # fmt: skip
    assert result.returncode != 0
    assert re.search(r"<\*\* +550 5\.1\.1 ", result.stdout), result.stdout
    assert_still_serving(server)


def test_relay_from_loopback_is_queued_not_delivered(server: MailServer, swaks: str) -> None:
    """Relaying is allowed from loopback (a trusted network by default). The next hop of
    remote.example is a closed loopback port, so the message is deferred and stays queued."""
    mark = marker()
    result = swaks_run(
        swaks, server, "--to", "relay@remote.example", "--from", "x@example.org",
        "--header", f"Subject: relay {mark}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
    match = QUEUED.search(result.stdout)
    assert match, result.stdout
    qid = match.group(1)
    server.wait_for_log(rf"\b{qid}: from=<x@example.org>, size=\d+, nrcpt=1")
    # no outbound agent yet: it stays in the queue
    with sqlite3.connect(f"{server.queue_db.as_uri()}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT address, status FROM recipient WHERE qid = ?", (qid,)).fetchall()
    assert [address for address, _status in rows] == ["relay@remote.example"]
    server.wait_for_log(rf"\b{qid}: to=<relay@remote\.example>, relay=.*, status=deferred ")
    with sqlite3.connect(f"{server.queue_db.as_uri()}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT address, status FROM recipient WHERE qid = ?", (qid,)).fetchall()
    assert [address for address, _status in rows] == ["relay@remote.example"]
    assert mark.encode() not in all_mail(server)
    assert not re.search(
        rf"\b{qid}: (to=<relay@remote\.example>.*status=sent|removed)", server.log()
    )


DISGUISES = [
    "user%remote.example@localhost",
    "@a.example,@b.example:user@remote.example",
    '"user@remote.example"@localhost',
    "remote.example!user@localhost",
    "user@remote.example",
]


def test_no_relay_for_untrusted_clients(mail_server: ServerFactory, swaks: str) -> None:
    strict = mail_server(settings={"trusted_networks": []})
    for rcpt in DISGUISES:
        result = swaks_run(
            swaks, strict, "--quit-after", "RCPT", "--to", rcpt, "--from", "x@example.org"
        )
        assert re.search(r"<\*\* +554 5\.7\.1 ", result.stdout), (rcpt, result.stdout)
    # local mail is still welcome from anywhere
    mark = marker()
    qid = send(strict, "x@example.org", ["postmaster@localhost"], make_message(mark))
    assert mark.encode() in wait_for_qid(strict, "postmaster", qid)
    assert not list((strict.state_dir / "mail").glob("*remote*"))


# ---------------------------------------------------------------------- 3. bad input


def test_overlong_command_lines(server: MailServer) -> None:
    with session(server) as client:
        assert client.command("NOOP " + "x" * 600)[0] == 500  # over 512, still buffered
        assert client.command("NOOP " + "y" * 20_000)[0] == 500  # far over: discarded
        assert client.command(b"MAIL FROM:<" + b"a" * 1200 + b"@example.org>")[0] == 500
        assert client.command("NOOP") == (250, ["2.0.0 Ok"])
        assert client.command("QUIT")[0] == 221
    assert_still_serving(server)


def test_nul_byte_in_command(server: MailServer) -> None:
    with session(server) as client:
        assert client.command(b"NOOP \x00")[0] == 500
        assert client.command(b"MAIL FROM:<a\x00b@example.org>")[0] == 500
        assert client.command(b"MAIL FROM:<ab@example.org>")[0] == 250
        assert client.command("QUIT")[0] == 221
    assert_still_serving(server)


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n"])
def test_smuggling_with_bare_line_ends_is_refused(server: MailServer, fake_end: bytes) -> None:
    mark = marker()
    smuggled = (
        b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<frank@localhost>\r\nDATA\r\n"
        b"Subject: SMUGGLED " + mark.encode() + b"\r\n\r\nsmuggled\r\n.\r\n"
    )
    with session(server) as client:
        assert client.command("MAIL FROM:<x@example.org>")[0] == 250
        assert client.command("RCPT TO:<frank@localhost>")[0] == 250
        assert client.command("DATA")[0] == 354
        client.send(b"Subject: carrier " + mark.encode() + b"\r\n\r\nhello" + fake_end + smuggled)
        code, text = client.reply()
        assert code == 554, text
        assert text[0].startswith("5.5.2"), text
        # nothing after the real end of data was taken as a command: QUIT gets the next reply
        assert client.command("QUIT")[0] == 221
        assert client.read_to_eof() == b""
    assert_still_serving(server)  # a later message is delivered, the smuggled one is not
    assert mark.encode() not in all_mail(server)


def test_command_sequence_errors(server: MailServer) -> None:
    with session(server) as client:
        assert client.command("RCPT TO:<postmaster@localhost>")[0] == 503
        assert client.command("DATA")[0] == 503
        assert client.command("MAIL FROM:<x@example.org>")[0] == 250
        assert client.command("DATA")[0] == 503
        # a refused BDAT still has its 5 octets consumed: "QUIT\n" is data, not a command
        client.send(b"BDAT 5 LAST\r\nQUIT\n")
        assert client.reply()[0] == 503
        assert client.command("MAIL FROM:<y@example.org>")[0] == 503  # nested MAIL
        assert client.command("RSET")[0] == 250
        assert client.command("QUIT")[0] == 221
    assert_still_serving(server)


def test_too_many_recipients(server: MailServer) -> None:
    with session(server) as client:
        assert client.command("MAIL FROM:<x@example.org>")[0] == 250
        client.send(b"RCPT TO:<postmaster@localhost>\r\n" * 101)
        replies = client.replies(101)
        assert [code for code, _ in replies[:100]] == [250] * 100
        assert replies[100][0] == 452 and replies[100][1][0].startswith("4.5.3"), replies[100]
        assert client.command("RSET")[0] == 250
        assert client.command("QUIT")[0] == 221
    assert_still_serving(server)


def test_oversize_message_then_next_transaction_works(server: MailServer) -> None:
    limit = MESSAGE_SIZE
    line = b"y" * 78 + b"\r\n"
    big = b"Subject: too big\r\n\r\n" + line * (limit // len(line) + 1000)
    mark = marker()
    with session(server) as client:
        assert client.command("MAIL FROM:<x@example.org>")[0] == 250
        assert client.command("RCPT TO:<frank@localhost>")[0] == 250
        assert client.command("DATA")[0] == 354
        client.send(big + b".\r\n")
        code, text = client.reply()  # only after the whole body was read
        assert code == 552 and text[0].startswith("5.3.4"), text
        assert client.command("MAIL FROM:<x@example.org>")[0] == 250
        assert client.command("RCPT TO:<frank@localhost>")[0] == 250
        assert client.command("DATA")[0] == 354
        code, text = client.command(make_message(mark) + b".")
        assert code == 250, text
        qid = QUEUED.search(text[0])
        assert qid
        assert client.command("QUIT")[0] == 221
    assert mark.encode() in wait_for_qid(server, "frank", qid.group(1))
    # and the SIZE declaration is checked up front
    with session(server) as client:
        assert client.command(f"MAIL FROM:<x@example.org> SIZE={limit + 1}")[0] == 552


def test_unknown_command_and_help(server: MailServer) -> None:
    with session(server) as client:
        code, text = client.command("FROBNICATE now")
        assert code == 500 and text[0].startswith("5.5.2"), text
        code, text = client.command("HELP")
        assert code == 214
        listed = " ".join(text).split()
        for verb in ("HELO", "EHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP",
                     "QUIT", "VRFY", "EXPN", "HELP"):  # fmt: skip
            assert verb in listed, (verb, text)
        # The MX port offers no AUTH, and ETRN only for held domains: HELP does not list
        # what would answer 502 (STARTTLS only where EHLO offers it).
        assert "AUTH" not in listed and "ETRN" not in listed, text
        assert client.command("ETRN example.org")[0] == 502
        ehlo = " ".join(client.command("EHLO help.test")[1])
        assert ("STARTTLS" in listed) == ("STARTTLS" in ehlo), (text, ehlo)
        code, text = client.command("HELP mail")
        assert code == 214 and "MAIL FROM:" in text[0], text
        assert client.command("QUIT")[0] == 221
    assert_still_serving(server)


def test_lf_only_telnet_style_commands(server: MailServer) -> None:
    mark = marker()
    with RawClient(server.host, server.smtp_port) as client:
        assert client.reply()[0] == 220
        client.send(b"HELO telnet.test\n")
        assert client.reply()[0] == 250
        client.send(b"MAIL FROM:<x@example.org>\n")
        assert client.reply()[0] == 250
        client.send(b"RCPT TO:<frank@localhost>\n")
        assert client.reply()[0] == 250
        client.send(b"DATA\n")
        assert client.reply()[0] == 354
        # the message itself must use CRLF: bare LF in content would taint it (smuggling)
        client.send(make_message(mark) + b".\r\n")
        code, text = client.reply()
        assert code == 250, text
        qid = QUEUED.search(text[0])
        assert qid
        client.send(b"QUIT\n")
        assert client.reply()[0] == 221
    data = wait_for_qid(server, "frank", qid.group(1))
    assert b"Received: from telnet.test (unknown [127.0.0.1])" in data
    assert b"with SMTP id" in data


def test_error_budget_ends_the_session(server: MailServer) -> None:
    limit = HARD_ERROR_LIMIT
    with session(server) as client:
        for _ in range(limit - 1):
            assert client.command("BOGUS")[0] == 500
        code, _ = client.command("BOGUS")
        assert code == 500
        code, text = client.reply()
        assert code == 421 and text[0].startswith("4.7.0"), text
        assert client.is_closed_by_peer()
    assert_still_serving(server)


def test_early_talker_is_refused(mail_server: ServerFactory) -> None:
    pausing = mail_server(settings={"limits": {"greet_pause": 0.5}})
    with RawClient(pausing.host, pausing.smtp_port) as client:
        client.send(b"EHLO rude.test\r\n")
        code, text = client.reply()
        assert code == 554 and text[0].startswith("5.5.0"), text
        assert client.is_closed_by_peer()
    # a client that waits for the greeting is served
    mark = marker()
    qid = send(pausing, "x@example.org", ["postmaster@localhost"], make_message(mark))
    assert mark.encode() in wait_for_qid(pausing, "postmaster", qid)


def test_connection_limit_per_ip(mail_server: ServerFactory) -> None:
    limited = mail_server(settings={"limits": {"connections_per_ip": 2}})
    first = RawClient(limited.host, limited.smtp_port)
    second = RawClient(limited.host, limited.smtp_port)
    try:
        assert first.reply()[0] == 220
        assert second.reply()[0] == 220
        with RawClient(limited.host, limited.smtp_port) as third:
            code, text = third.reply()
            assert code == 421 and text[0].startswith("4.7.0"), text
            assert third.is_closed_by_peer()
        assert first.command("QUIT")[0] == 221
    finally:
        first.close()
        second.close()
    # once the others have gone, a new client is served (the server notices the close quickly)
    deadline = time.monotonic() + 10
    while True:
        try:
            mark = marker()
            qid = send(limited, "x@example.org", ["postmaster@localhost"], make_message(mark))
            break
        except smtplib.SMTPConnectError:
            assert time.monotonic() < deadline, limited.log_tail()
            time.sleep(0.05)
    assert mark.encode() in wait_for_qid(limited, "postmaster", qid)


# ---------------------------------------------------------------------- 4. concurrency


def test_fifty_concurrent_clients(server: MailServer) -> None:
    clients, per_client = 50, 2
    start = threading.Barrier(clients, timeout=30)
    run = marker()

    def client(number: int) -> list[tuple[str, str]]:
        start.wait()
        sent = []
        with smtplib.SMTP(
            server.host, server.smtp_port, local_hostname="load.test", timeout=60
        ) as smtp:
            for i in range(per_client):
                mark = f"{run}-{number}-{i}"
                qid = send_on(smtp, "load@example.org", ["load@localhost"], make_message(mark))
                sent.append((qid, mark))
        return sent

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [item for items in pool.map(client, range(clients)) for item in items]
    assert len(results) == clients * per_client
    assert len({qid for qid, _ in results}) == clients * per_client
    for qid, _ in results:
        wait_removed(server, qid)
    delivered: dict[str, int] = {}
    for path in server.messages("load"):
        data = path.read_bytes()
        found = re.search(rb"Message-ID: <(" + run.encode() + rb"-\d+-\d+)@", data)
        if found:
            delivered[found.group(1).decode()] = delivered.get(found.group(1).decode(), 0) + 1
    assert delivered == {mark: 1 for _, mark in results}


# ---------------------------------------------------------------------- 5. a big message


def test_twenty_mebibyte_message(mail_server: ServerFactory) -> None:
    big = mail_server(settings={"limits": {"message_size": 32 * 1024 * 1024}})
    send(big, "x@example.org", ["postmaster@localhost"], make_message(marker()))  # warm up
    big.wait_for_messages("postmaster", 1)
    before = big.memory()["VmHWM"]
    line = os.urandom(57).hex()[:76].encode() + b"\r\n"
    size = 20 * 1024 * 1024
    message = make_message(marker(), body="") + line * (size // len(line))
    qid = send(big, "x@example.org", ["postmaster@localhost"], message)
    data = wait_for_qid(big, "postmaster", qid, timeout=60)
    rest = body_of(data)
    assert hashlib.sha256(rest).hexdigest() == hashlib.sha256(to_lf(message)).hexdigest()
    growth = (big.memory()["VmHWM"] - before) * 1024
    print(f"peak RSS grew by {growth / 2**20:.1f} MiB (VmHWM before: {before} kB)")
    assert growth < 32 * 1024 * 1024, f"peak RSS grew by {growth / 2**20:.1f} MiB"


# ---------------------------------------------------------------------- 9. the newcomer


#: What the built-in defaults listen on (submissions and POP3S only with a certificate).
DEFAULT_PORTS = {"smtp": 2525, "submission": 2587, "pop3": 2110}


def test_newcomer_defaults(tmp_path: Path, swaks: str) -> None:
    """No config file, a fresh cwd: `mailhaven serve` + swaks, and the mail is in ./mailhaven-data."""
    for name, port in DEFAULT_PORTS.items():
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                pytest.skip(f"default {name} port {port} is busy")
    exe = Path(sys.executable).parent / "mailhaven"
    command = [str(exe) if exe.exists() else shutil.which("mailhaven") or "mailhaven", "serve"]
    newcomer = MailServer(
        tmp_path,
        command=command,
        config_file=False,
        ports={"smtp": 2525},
        settings={"state_dir": "mailhaven-data"},
    )
    assert not newcomer.config_path.exists()
    try:
        newcomer.start()
        result = subprocess.run(
            [swaks, "--server", "127.0.0.1:2525", "--to", "postmaster@localhost"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        found = newcomer.wait_for_messages("postmaster", 1)
        assert found[0].parent == newcomer.dir / "mailhaven-data" / "mail" / "localhost" / "postmaster" / "new"
        assert b"X-Mailer: swaks" in found[0].read_bytes()
        assert "config=(built-in defaults)" in newcomer.log()
    finally:
        assert newcomer.stop() == 0
