"""Postfix's lmtp(8) client delivering into mailhaven's Maildirs through `[listen] lmtp`.

A private Postfix (tests/support/postfix.py) takes mail over SMTP and hands everything that is
not its own to `default_transport = lmtp:inet:<mailhaven's LMTP port>`. Per recipient, mailhaven
answers with the delivery's own result: stored (250), mailbox full (452 4.2.2: Postfix keeps
the message and retries) or unknown (550 5.1.1 at RCPT: Postfix bounces it).
"""

from __future__ import annotations

import smtplib
import socket
from pathlib import Path

import pytest
from tests.e2e.conftest import ServerFactory
from tests.fakes import maildir_messages
from tests.support.postfix import postfix_instance
from tests.support.server import MailServer

pytestmark = pytest.mark.e2e


def messages(server: MailServer, user: str) -> list[bytes]:
    return maildir_messages(server.maildir(user))


def lmtp_server(mail_server: ServerFactory, **quota: str) -> MailServer:
    return mail_server(
        services=("smtp", "lmtp"),
        settings={
            "local_users": ["postmaster", "alice", "bob"],
            "quota": {"users": dict(quota)},
        },
    )


def test_postfix_delivers_over_lmtp_per_recipient(
    tmp_path: Path, mail_server: ServerFactory
) -> None:
    server = lmtp_server(mail_server, bob="1k")
    bob = server.maildir("bob")
    bob.mkdir(parents=True)
    for sub in ("tmp", "new", "cur"):
        (bob / sub).mkdir()
    (bob / "maildirsize").write_bytes(b"1024S\n1000 1\n")  # bob: full
    with postfix_instance(
        keep=tmp_path,
        settings={"default_transport": f"lmtp:inet:127.0.0.1:{server.port('lmtp')}"},
        services="lmtp unix - - n - - lmtp\n",
    ) as pf:
        with smtplib.SMTP(pf.host, pf.port, timeout=20) as s:
            s.ehlo("client.test")
            s.sendmail(
                "sender@pf.test",
                ["alice@localhost", "bob@localhost", "nobody@localhost"],
                b"From: sender@pf.test\r\nTo: alice@localhost\r\nSubject: via postfix lmtp\r\n"
                b"\r\nhello over LMTP\r\n",
            )
        pf.wait_for_log(r"to=<alice@localhost>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, .*"
                        r"status=sent \(250 2\.0\.0", timeout=20)
        pf.wait_for_log(r"to=<bob@localhost>, .*status=deferred .*452 4\.2\.2", timeout=20)
        pf.wait_for_log(r"to=<nobody@localhost>, .*status=bounced .*550 5\.1\.1", timeout=20)
        [copy] = messages(server, "alice")
        assert b"Subject: via postfix lmtp" in copy
        assert b"with LMTP id" in copy and b"Delivered-To: alice@localhost" in copy
        assert messages(server, "bob") == []
        # bob makes room; Postfix's next retry delivers, once
        (bob / "maildirsize").unlink()
        pf.flush()
        pf.wait_for_log(r"to=<bob@localhost>, .*status=sent \(250 2\.0\.0", timeout=20)
        assert len(messages(server, "bob")) == 1
    assert "Traceback" not in server.log()


def test_raw_lmtp_dialogue_and_bad_input(mail_server: ServerFactory) -> None:
    server = lmtp_server(mail_server)
    with socket.create_connection((server.host, server.port("lmtp")), timeout=10) as sock:
        f = sock.makefile("rwb")

        def reply() -> bytes:
            lines = []
            while True:
                line = f.readline()
                lines.append(line)
                if line[3:4] != b"-":
                    return b"".join(lines)

        def say(line: bytes) -> bytes:
            f.write(line + b"\r\n")
            f.flush()
            return reply()

        assert reply().startswith(b"220 ")
        assert say(b"EHLO client.test").startswith(b"500")  # RFC 2033 §4.1: LHLO only
        assert say(b"LHLO client.test").startswith(b"250")
        assert say(b"MAIL FROM:<s@remote.example>").startswith(b"250")
        assert say(b"RCPT TO:<alice@localhost>").startswith(b"250")
        assert say(b"RCPT TO:<someone@remote.example>").startswith(b"550 5.1.1")  # no relay
        assert say(b"RCPT TO:<bob@localhost>").startswith(b"250")
        assert say(b"DATA").startswith(b"354")
        f.write(b"Subject: raw\r\n\r\n" + b"line\r\n" * 40000 + b".\r\n")  # ~240 KB
        f.flush()
        first, second = reply(), reply()  # one per accepted recipient, in RCPT order
        assert first.startswith(b"250 2.0.0") and second.startswith(b"250 2.0.0")
        assert say(b"QUIT").startswith(b"221")
    [alice] = messages(server, "alice")
    assert alice.endswith(b"line\n" * 3 + b"line\n")
    assert len(messages(server, "bob")) == 1
    assert list((server.state_dir / "lmtp").iterdir()) == []  # no body file left behind
    # one Postfix-shaped line per recipient (pflogsumm, grep status=)
    server.wait_for_log(r"mailhaven/lmtp\[\d+\]: \w+: to=<alice@localhost>, relay=local, "
                        r"delay=[\d.]+, delays=0/0/0/[\d.]+, dsn=2\.0\.0, status=sent ")
