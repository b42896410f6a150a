"""End to end: `smtp_processes = 2`, an acceptor process beside the daemon.

To prove that the *acceptor* received a message (the kernel may hand any connection to either
process), the daemon is frozen with SIGSTOP: only the acceptor can then accept, answer and
commit. Its doorbell ring waits in the socket buffer until the daemon runs again (SIGCONT) and
delivers. The lifeline is shown by SIGKILLing the daemon: the acceptor stops by itself.
"""

from __future__ import annotations

import os
import signal
import smtplib
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from tests.e2e.conftest import ServerFactory
from tests.support.server import MailServer

pytestmark = pytest.mark.e2e

SETTINGS = {
    "smtp_processes": 2,
    "local_domains": ["localhost"],
    "local_users": ["alice"],
    "log_level": "info",
}


def message(mark: str) -> bytes:
    return f"From: <bob@remote.test>\r\nSubject: {mark}\r\n\r\nbody {mark}\r\n".encode()


def acceptor_pid(server: MailServer) -> int:
    [match] = server.wait_for_log(r"acceptor 1 started \(pid (\d+)\)", timeout=10)
    server.wait_for_log(r"acceptor ready on 1 smtp socket", timeout=10)
    return int(match.group(1))


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@contextmanager
def frozen(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_the_acceptor_receives_while_the_daemon_is_frozen(mail_server: ServerFactory) -> None:
    server = mail_server(settings=SETTINGS)
    pid = acceptor_pid(server)
    try:
        with frozen(server.pid):
            with smtplib.SMTP(server.host, server.smtp_port, timeout=20) as client:
                client.ehlo("client.test")
                client.mail("bob@remote.test")
                client.rcpt("alice@localhost")
                code, reply = client.data(message("frozen"))
            assert code == 250 and b"queued as" in reply, reply
        # the daemon runs again: the doorbell rang meanwhile, so it delivers at once
        [delivered] = server.wait_for_messages("alice", 1, timeout=10)
        assert b"body frozen" in delivered.read_bytes()
        qid = reply.decode().rsplit(" ", 1)[-1]
        server.wait_for_log(rf"smtpd\[{pid}\]: {qid}: client=", timeout=5)
        # both processes serve the same port: a burst is received and delivered in full
        for i in range(20):
            with smtplib.SMTP(server.host, server.smtp_port, timeout=20) as client:
                client.sendmail("bob@remote.test", ["alice@localhost"], message(f"burst {i}"))
        assert len(server.wait_for_messages("alice", 21, timeout=20)) == 21
    finally:
        server.stop()
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid), "SIGTERM to the daemon stops its acceptor too"


def test_etrn_on_the_acceptor_is_answered_by_the_daemon(mail_server: ServerFactory) -> None:
    settings = dict(SETTINGS, etrn={"held_domains": ["parttime.test"]})
    server = mail_server(settings=settings)
    acceptor_pid(server)
    with frozen(server.pid):  # only the acceptor can take this connection
        client = smtplib.SMTP(server.host, server.smtp_port, timeout=20)
        client.ehlo("gw.parttime.test")
    try:
        code, text = client.docmd("ETRN", "parttime.test")
        assert code == 251 and b"no messages waiting" in text, text
        assert client.docmd("ETRN", "other.test")[0] == 459
    finally:
        client.quit()


def test_the_acceptor_stops_when_the_daemon_is_killed(mail_server: ServerFactory) -> None:
    server = mail_server(settings=SETTINGS)
    pid = acceptor_pid(server)
    try:
        server.kill()  # SIGKILL: no shutdown code runs in the daemon
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid), "the lifeline pipe's end of file stops the acceptor"
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
