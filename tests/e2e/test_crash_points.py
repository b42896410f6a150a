"""End to end: a SIGKILL at each named crash point (`mailhaven.faults`), then a restart.

For every point of docs/durability.md a real `mailhaven serve` runs with
`MAILHAVEN_CRASH_AT=<point>`; the test drives one message through it (smtplib, or the sendmail
CLI for pickup), checks that the process died by SIGKILL at that very point (its log line, the
exit status, and what is on disk then), restarts it without the variable, lets it finish, and
counts the copies that arrived (Maildir, or the loopback relay sink). The guarantee checked is
the table's: every message acknowledged (250, or sendmail's exit 0) arrives; duplicates only at
the points documented as at-least-once, and then exactly two copies; a message that was never
acknowledged is retried by the client, as an SMTP client must, and the count after the retry
is what the table says.
"""

from __future__ import annotations

import email.utils
import os
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
from tests.e2e.conftest import ServerFactory
from tests.e2e.send_support import Sink
from tests.support.server import MailServer, free_port, split_trace, to_lf

from mailhaven.faults import ENV, POINTS
from mailhaven.mailbox import maildir

pytestmark = pytest.mark.e2e

QUEUED = re.compile(r"queued as ([A-Za-z0-9]+)")
#: above the spool's inline limit (128 KiB), so the body takes the file path
BIG = 200 * 1024
SETTLE = 20.0
#: files a copy killed before its name in new/ leaves in tmp/: none when it was unnamed
#: (O_TMPFILE; the kernel frees it), else the named file (what a cleaner removes later)
TMP_LEFT = 0 if maildir._unnamed.usable else 1

Flow = Literal["smtp", "relay", "bounce", "pickup"]


@dataclass(frozen=True)
class Case:
    point: str
    flow: Flow
    #: the client got its acknowledgement before the crash
    acked: bool
    #: copies delivered in the end (after the client's retry when not acknowledged)
    copies: int
    size: int = 0
    #: `[mailbox] delivery`: the points above are on the queued path; "direct" cases check
    #: final delivery at commit time (`scheduler.direct`: local mail never queued)
    delivery: Literal["queued", "direct"] = "queued"


CASES = [
    # not acknowledged and not committed: lost by design; the client's retry is the one copy
    Case("body_written", "smtp", acked=False, copies=1, size=BIG),
    Case("body_synced", "smtp", acked=False, copies=1, size=BIG),
    Case("body_linked", "smtp", acked=False, copies=1, size=BIG),
    Case("before_commit", "smtp", acked=False, copies=1),
    # committed but not acknowledged: delivered, and the client's retry is a second copy
    Case("after_commit", "smtp", acked=False, copies=2),
    Case("before_250", "smtp", acked=False, copies=2),
    # acknowledged: exactly-once
    Case("maildir_tmp_written", "smtp", acked=True, copies=1),
    Case("bounce_built", "bounce", acked=True, copies=1),
    Case("pickup_read", "pickup", acked=True, copies=1),
    # acknowledged: at-least-once (a second copy)
    Case("maildir_linked", "smtp", acked=True, copies=2),
    Case("delivered", "smtp", acked=True, copies=2),
    Case("delivered", "relay", acked=True, copies=2),
    Case("bounce_queued", "bounce", acked=True, copies=2),
    Case("pickup_queued", "pickup", acked=True, copies=2),
    # direct delivery: the copies are made before the 250, nothing is queued
    # a tmp/ file only: not acknowledged, and the client's retry is the one copy
    Case("maildir_tmp_written", "smtp", acked=False, copies=1, delivery="direct"),
    # in new/ but not acknowledged: the client's retry is a duplicate (as after_commit)
    Case("maildir_linked", "smtp", acked=False, copies=2, delivery="direct"),
    Case("maildir_linked", "smtp", acked=False, copies=2, size=BIG, delivery="direct"),
    Case("before_250", "smtp", acked=False, copies=2, delivery="direct"),
    # the report went straight into the sender's Maildir; the sweep makes it again
    Case("bounce_queued", "bounce", acked=True, copies=2, delivery="direct"),
    # delivered from the maildrop; the drop file is collected again
    Case("pickup_queued", "pickup", acked=True, copies=2, delivery="direct"),
]


def test_every_point_is_tested() -> None:
    assert {c.point for c in CASES} == POINTS


def message(mark: str, *, sender: str, to: str, size: int, extra: str = "") -> bytes:
    body = "".join(f"{mark} {i:06d} " + "z" * 60 + "\r\n" for i in range(size // 76 + 1))
    return (
        f"From: <{sender}>\r\nTo: <{to}>\r\n{extra}Subject: crash {mark}\r\n"
        f"Date: {email.utils.formatdate()}\r\nMessage-ID: <{mark}@example.org>\r\n\r\n"
        f"{body}END {mark}\r\n"
    ).encode()


def try_send(server: MailServer, sender: str, rcpt: str, data: bytes) -> str | None:
    """One transaction; the queue id on 250, None when the server died before answering."""
    try:
        with smtplib.SMTP(server.host, server.smtp_port, "client.test", timeout=20) as s:
            s.ehlo()
            assert s.mail(sender)[0] == 250
            assert s.rcpt(rcpt)[0] == 250
            code, text = s.data(data)
    except (smtplib.SMTPServerDisconnected, ConnectionError):
        return None
    assert code == 250, text
    found = QUEUED.search(text.decode())
    assert found, text
    return found.group(1)


def sendmail(server: MailServer, data: bytes, rcpt: str) -> None:
    exe = Path(sys.executable).parent / "mailhaven"
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "MAILHAVEN_CONFIG")}
    done = subprocess.run(
        [str(exe), "sendmail", "-C", str(server.config_path), "-i", rcpt],
        input=data, cwd=server.dir, env=env, capture_output=True, timeout=30, check=False,
    )
    assert done.returncode == 0, done.stderr  # accepted: from here on it must not be lost


def maildir_copies(server: MailServer, user: str, needle: str) -> int:
    return sum(needle.encode() in path.read_bytes() for path in server.messages(user))


def maildir_files(server: MailServer, user: str, sub: str) -> list[Path]:
    path = server.maildir(user) / sub
    return sorted(path.iterdir()) if path.exists() else []


def wait_for_crash(server: MailServer, point: str) -> None:
    code = server.wait_exit(20)
    assert code == -signal.SIGKILL, f"exit {code}\n{server.log_tail()}"
    server.wait_for_log(rf"crash injected at {point} \(pid", timeout=1)


def wait_idle(server: MailServer, count: Callable[[], int], want: int) -> int:
    """Wait until the queue is empty and `want` copies arrived; then a short look for more."""
    deadline = time.monotonic() + SETTLE
    while server.queued_messages() or count() < want:
        assert time.monotonic() < deadline, (
            f"queue {server.queued_messages()}, copies {count()} of {want}\n{server.log_tail()}"
        )
        time.sleep(0.05)
    time.sleep(0.3)  # nothing queued, so nothing more can arrive; this only guards the count
    return count()


def case_id(c: Case) -> str:
    return "-".join([c.point, c.flow, *(["big"] if c.size else []), c.delivery])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_crash_point(mail_server: ServerFactory, case: Case) -> None:
    sink: Sink | None = None
    # one engine process: the crash must hit the process the test watches (with workers it
    # would hit whichever process took the connection)
    settings: dict[str, object] = {
        "local_users": ["postmaster", "alice"],
        "mailbox": {"delivery": case.delivery},
        "smtp_processes": 1,
    }
    if case.flow == "relay":
        sink = Sink("127.0.0.1", free_port()).start()
        settings["relay"] = {
            "transport": {"remote.example": f"[127.0.0.1]:{sink.port}"},
            "tls": "none",
        }
    server = mail_server(start=False, settings=settings)
    server.env[ENV] = case.point
    server.start()
    mark = uuid.uuid4().hex
    try:
        sender, rcpt, user, extra = "sender@example.org", "postmaster@localhost", "postmaster", ""
        if case.flow == "relay":
            rcpt = "someone@remote.example"
        if case.flow == "bounce":
            # the message has been here before: local delivery refuses it (554 5.4.6, a loop),
            # so a bounce goes to the (local) sender
            sender, user, extra = "alice@localhost", "alice", f"Delivered-To: {rcpt}\r\n"
        data = message(mark, sender=sender, to=rcpt, size=case.size, extra=extra)

        if case.flow == "pickup":
            sendmail(server, data, rcpt)
        else:
            qid = try_send(server, sender, rcpt, data)
            assert (qid is not None) == case.acked, f"{case}: {qid}\n{server.log_tail()}"
        wait_for_crash(server, case.point)
        check_disk_at_crash(server, case)

        del server.env[ENV]
        server.start()
        if not case.acked:  # the client never got its 250: it must try again
            assert try_send(server, sender, rcpt, data) is not None

        def copies() -> int:
            if sink is not None:
                return sum(mark.encode() in r.content for r in sink.received)
            if case.flow == "bounce":  # reports about our message in the sender's Maildir
                return maildir_copies(server, user, f"Subject: crash {mark}")
            return maildir_copies(server, user, f"END {mark}")

        assert wait_idle(server, copies, case.copies) == case.copies, server.log_tail()
        if case.flow == "bounce":
            assert maildir_copies(server, "postmaster", mark) == 0  # refused, only reported
        if case.flow == "smtp":  # every copy complete, byte for byte
            for path in server.messages(user):
                assert split_trace(path.read_bytes())[1] == to_lf(data)
        if sink is not None:
            for received in sink.received:
                assert received.content.endswith(data)  # our Received:, then it as sent
        spool_tmp = list((server.state_dir / "spool" / "tmp").iterdir())
        assert spool_tmp == [], "recovery removes bodies that were never committed"
    finally:
        if sink is not None:
            sink.stop()


def check_disk_at_crash(server: MailServer, case: Case) -> None:
    """What the crash left, as docs/durability.md describes it (proof of where it hit)."""
    spool = server.state_dir / "spool"
    if case.delivery == "direct":
        check_direct_disk_at_crash(server, case)
        return
    match case.point:
        case "body_written" | "body_synced":
            assert len(list((spool / "tmp").iterdir())) == 1
            assert list((spool / "bodies").iterdir()) == []
        case "body_linked":
            assert list((spool / "tmp").iterdir()) == []
            assert len(list((spool / "bodies").iterdir())) == 1
            assert server.queued_messages() == 0
        case "before_commit":
            assert server.queued_messages() == 0
        case "after_commit" | "before_250":
            assert server.queued_messages() == 1
        case "maildir_tmp_written":
            assert len(maildir_files(server, "postmaster", "tmp")) == TMP_LEFT
            assert maildir_files(server, "postmaster", "new") == []
            assert server.queued_messages() == 1
        case "maildir_linked":
            assert maildir_files(server, "postmaster", "tmp") == []
            assert len(maildir_files(server, "postmaster", "new")) == 1
            assert server.queued_messages() == 1
        case "delivered":
            assert server.queued_messages() == 1
        case "bounce_built":
            assert server.queued_messages() == 1  # the original, finished, not yet removed
        case "bounce_queued":
            assert server.queued_messages() == 2  # the original and its report
        case "pickup_read":
            assert server.queued_messages() == 0
            assert len(list((server.state_dir / "maildrop" / "new").iterdir())) == 1
        case "pickup_queued":
            assert server.queued_messages() == 1
            assert len(list((server.state_dir / "maildrop" / "new").iterdir())) == 1
        case _:
            raise AssertionError(f"no disk check for {case.point}")


def check_direct_disk_at_crash(server: MailServer, case: Case) -> None:
    """Direct delivery: the queue is never written for local mail (the bounce's original
    is, having been refused)."""
    match case.point:
        case "maildir_tmp_written":
            assert len(maildir_files(server, "postmaster", "tmp")) == TMP_LEFT
            assert maildir_files(server, "postmaster", "new") == []
            assert server.queued_messages() == 0
        case "maildir_linked" | "before_250":
            assert maildir_files(server, "postmaster", "tmp") == []
            assert len(maildir_files(server, "postmaster", "new")) == 1
            assert server.queued_messages() == 0
        case "bounce_queued":
            assert server.queued_messages() == 1  # the original; its report is in alice's Maildir
            assert len(maildir_files(server, "alice", "new")) == 1
        case "pickup_queued":
            assert server.queued_messages() == 0
            assert len(maildir_files(server, "postmaster", "new")) == 1
            assert len(list((server.state_dir / "maildrop" / "new").iterdir())) == 1
        case _:
            raise AssertionError(f"no disk check for {case.point} (direct)")


@pytest.mark.parametrize("point", ["before_commit", "after_commit"])
def test_crash_in_a_group_commit(mail_server: ServerFactory, point: str) -> None:
    """Several clients' messages end DATA together, so one COMMIT may carry several of them;
    a crash there loses none of the retried ones and duplicates only what had committed."""
    clients = 6
    server = mail_server(  # one process, as above
        start=False, settings={"mailbox": {"delivery": "queued"}, "smtp_processes": 1}
    )
    server.env[ENV] = point
    server.start()
    marks = [uuid.uuid4().hex for _ in range(clients)]
    datas = [
        message(m, sender="sender@example.org", to="postmaster@localhost", size=2000)
        for m in marks
    ]
    ready = threading.Barrier(clients, timeout=20)
    acked: list[str | None] = [None] * clients

    def client(i: int) -> None:
        try:
            with smtplib.SMTP(server.host, server.smtp_port, "client.test", timeout=20) as s:
                s.ehlo()
                assert s.mail("sender@example.org")[0] == 250
                assert s.rcpt("postmaster@localhost")[0] == 250
                ready.wait()
                code, text = s.data(datas[i])
            acked[i] = text.decode() if code == 250 else None
        except (smtplib.SMTPServerDisconnected, ConnectionError):
            pass

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    wait_for_crash(server, point)
    assert acked == [None] * clients  # the first COMMIT after start-up was the crash
    committed = server.queued_messages()
    if point == "before_commit":
        assert committed == 0
    else:
        assert 1 <= committed <= clients
    print(f"{point}: {committed} of {clients} message(s) committed at the crash")

    del server.env[ENV]
    server.start()
    for i in range(clients):  # every client retries its unacknowledged message
        assert try_send(server, "sender@example.org", "postmaster@localhost", datas[i])

    def total() -> int:
        return sum(maildir_copies(server, "postmaster", f"END {m}") for m in marks)

    assert wait_idle(server, total, clients + committed) == clients + committed
    for m in marks:
        assert maildir_copies(server, "postmaster", f"END {m}") in (1, 2)
