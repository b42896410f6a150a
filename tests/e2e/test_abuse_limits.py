"""End to end: per-user sender limits on submission (a stolen password's damage). An
authenticated user over `[checks.sender_limits]` gets `450 4.7.1` at MAIL FROM or RCPT TO; the
first time in a window a warning is logged and the postmaster gets a notice; the refusal lines
are what `contrib/fail2ban/filter.d/mailhaven-sender-limits.conf` matches (fail2ban-regex)."""

from __future__ import annotations

import os
import smtplib
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from tests.e2e.conftest import ServerFactory
from tests.support.server import MailServer

from mailhaven.mailbox.users import UserDB

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parents[2]
F2B = ROOT / ".tools" / "fail2ban"
FILTER = ROOT / "contrib" / "fail2ban" / "filter.d" / "mailhaven-sender-limits.conf"
MESSAGE = b"From: <bob@localhost>\r\nTo: <x@localhost>\r\nSubject: hi\r\n\r\nhello\r\n"


def serve(mail_server: ServerFactory, tmp_path: Path, **limits: object) -> MailServer:
    users = tmp_path / "users.passwd"
    db = UserDB(users, hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
    db.add("bob", "hunter2")
    db.add("alice", "secret")
    return mail_server(
        settings={
            "trusted_networks": [], "users_file": str(users),
            "local_users": ["postmaster"],
            "checks": {"sender_limits": {"messages": 2, "recipients": 5} | limits},
        },
        services=("smtp", "submission"),
    )  # fmt: skip


def submit(server: MailServer, user: str, password: str) -> smtplib.SMTP:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # self-signed
    smtp = smtplib.SMTP(server.host, server.port("submission"), "client.test", 10)
    smtp.starttls(context=context)
    smtp.login(user, password)
    return smtp


def test_message_limit_refuses_alerts_once_and_spares_others(
    mail_server: ServerFactory, tmp_path: Path
) -> None:
    server = serve(mail_server, tmp_path)
    with submit(server, "bob", "hunter2") as smtp:
        for _ in range(2):
            assert smtp.sendmail("bob@localhost", ["postmaster@localhost"], MESSAGE) == {}
        code, text = smtp.mail("bob@localhost")
        assert code == 450
        assert text.decode() == ("4.7.1 <bob@localhost>: Sender address rejected: Sender rate "
                                 "limit exceeded for bob@localhost: more than 2 messages in 3600 s, try "
                                 "again later")
        smtp.rset()
        assert smtp.mail("bob@localhost")[0] == 450  # still refused, no second alert
    with submit(server, "alice", "secret") as smtp:  # another user is not affected
        assert smtp.sendmail("alice@localhost", ["postmaster@localhost"], MESSAGE) == {}
    server.wait_for_log(r"warning: sender rate limit exceeded: sasl_username=bob@localhost "
                        r"client=unknown\[127\.0\.0\.1\]: more than 2 messages in 3600 s")
    server.wait_for_log(r"NOQUEUE: reject: MAIL from unknown\[127\.0\.0\.1\]: 450 4\.7\.1 ")
    # 2 from bob, 1 from alice, and the notice
    delivered = [p.read_bytes() for p in server.wait_for_messages("postmaster", 4)]
    notices = [m for m in delivered if b"Subject: sender rate limit exceeded by bob@localhost" in m]
    assert len(notices) == 1
    assert b"Auto-Submitted: auto-generated" in notices[0]
    assert b"The authenticated user bob@localhost sent more than 2 messages" in notices[0]
    assert server.log().count("warning: sender rate limit exceeded") == 1


def test_recipient_limit_and_fail2ban_filter(mail_server: ServerFactory, tmp_path: Path) -> None:
    server = serve(mail_server, tmp_path, messages=100, notify_postmaster=False)
    with submit(server, "bob", "hunter2") as smtp:
        smtp.mail("bob@localhost")
        codes = [smtp.rcpt("postmaster@localhost")[0] for _ in range(7)]
        assert codes == [250] * 5 + [450] * 2
    server.wait_for_log(r"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.1\]: 450 4\.7\.1 "
                        r"<bob@localhost>: Sender address rejected: Sender rate limit exceeded "
                        r"for bob@localhost: more than 5 recipients in 3600 s")
    assert server.stop() == 0
    assert server.messages("postmaster") == []  # notify_postmaster = false
    regex = F2B / "usr" / "bin" / "fail2ban-regex"
    if not regex.exists():
        pytest.skip("fail2ban is not unpacked (scripts/install-test-deps)")
    # installed as an admin would: next to fail2ban's own filters (it includes common.conf)
    installed = tmp_path / "filter.d"
    installed.mkdir()
    (installed / "common.conf").symlink_to(F2B / "etc" / "fail2ban" / "filter.d" / "common.conf")
    (installed / FILTER.name).write_bytes(FILTER.read_bytes())
    result = subprocess.run(
        [sys.executable, str(regex), "--out", "msg", str(server.log_path),
         str(installed / FILTER.name)],
        env={**os.environ, "PYTHONPATH": str(F2B / "usr" / "lib" / "python3" / "dist-packages")},
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    matched = result.stdout.splitlines()
    assert len(matched) == 2 and all("[127.0.0.1]" in line for line in matched), matched


def test_two_processes_share_one_count(mail_server: ServerFactory, tmp_path: Path) -> None:
    """`smtp_processes = 2`: the worker serves only the MX port, which offers no AUTH, and
    submission stays in the daemon, so every authenticated message of a user is counted in
    one place: the limit holds across separate connections, not once per process."""
    users = tmp_path / "users.passwd"
    db = UserDB(users, hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
    db.add("bob", "hunter2")
    server = mail_server(
        settings={
            "trusted_networks": [], "users_file": str(users), "local_users": ["postmaster"],
            "smtp_processes": 2,
            "checks": {"sender_limits": {"messages": 3, "recipients": 100,
                                         "notify_postmaster": False}},
        },
        services=("smtp", "submission"),
    )  # fmt: skip
    server.wait_for_log(r"worker 1 ready")
    with smtplib.SMTP(server.host, server.smtp_port, "client.test", 10) as mx:
        mx.ehlo()
        assert not mx.has_extn("auth")  # nothing authenticates where the workers listen
    codes = []
    for _ in range(8):  # a new connection each time, as a spam run spreads them
        with submit(server, "bob", "hunter2") as smtp:
            codes.append(smtp.mail("bob@localhost")[0])
            if codes[-1] == 250:
                smtp.rcpt("postmaster@localhost")
                smtp.data(MESSAGE)
    assert codes == [250] * 3 + [450] * 5
