"""mailhaven delivering into a real Dovecot over LMTP: Sieve fileinto, vacation, Dovecot down.

A private Dovecot (tests/support/dovecot_lmtp.py) is the store for `store.example`; mailhaven
routes that domain with `[relay] transport = { "store.example" = "lmtp:unix:..." }`. Bob's Sieve
vacation reply is submitted by Dovecot to a loopback sink (`submission_host`), which stands for
the outside world. Dovecot dying in the middle of a session, after DATA, is staged through a
loopback proxy (`tests.support.cutting_proxy`) that SIGKILLs Dovecot's lmtp process there.
"""

from __future__ import annotations

import contextlib
import mailbox
import os
import signal
import smtplib
from pathlib import Path

import pytest
from tests.e2e.conftest import ServerFactory
from tests.e2e.send_support import QUEUED, Sink, attempt_lines, relay_settings, wait_attempt
from tests.support.cutting_proxy import CuttingProxy
from tests.support.dovecot_lmtp import DovecotStore, dovecot_store
from tests.support.server import free_port

pytestmark = pytest.mark.e2e

SIEVE_ALICE = """require ["fileinto", "mailbox"];
if header :contains "subject" "[list]" { fileinto :create "lists"; }
"""
SIEVE_BOB = """require ["vacation"];
vacation :days 1 :subject "Out of office" "Bob is away until Monday.";
"""


def stored(store: DovecotStore, user: str, folder: str = "") -> list[bytes]:
    path = store.maildir(user) / (f".{folder}" if folder else "")
    if not path.exists():
        return []
    box = mailbox.Maildir(path, create=False)
    return [box.get_bytes(k) for k in box.iterkeys()]


def submit(port: int, rcpts: list[str], subject: str) -> str:
    message = (
        f"From: Sender <sender@remote.example>\r\nTo: {', '.join(rcpts)}\r\n"
        f"Subject: {subject}\r\nMessage-ID: <{subject.replace(' ', '.')}@remote.example>\r\n"
        f"\r\nhello\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.ehlo("client.test")
        s.mail("sender@remote.example")
        for rcpt in rcpts:
            code, text = s.rcpt(rcpt)
            assert code == 250, (rcpt, code, text)
        code, text = s.data(message)
        assert code == 250, text
    match = QUEUED.search(text.decode())
    assert match is not None
    return match.group(1)


def settings(store: DovecotStore, via: str, port: int | None = None) -> dict[str, object]:
    hop = f"lmtp:unix:{store.lmtp_socket}" if via == "unix" else \
        f"lmtp:[127.0.0.1]:{port or store.lmtp_port}"
    return relay_settings(
        dns=None, port=9, local_users=("postmaster", "alice", "bob"),
        local_domains=["localhost", "store.example"],
        relay={"transport": {"store.example": hop}},
    )


@pytest.mark.parametrize("via", ["unix", "tcp"])
def test_sieve_fileinto_and_vacation_through_dovecot(
    tmp_path: Path, mail_server: ServerFactory, via: str
) -> None:
    outside = Sink("127.0.0.1", free_port()).start()
    try:
        with dovecot_store(
            tmp_path, sieve_scripts={"alice": SIEVE_ALICE, "bob": SIEVE_BOB},
            submission_host=f"127.0.0.1:{outside.port}",
        ) as store:
            server = mail_server(settings=settings(store, via))
            qid = submit(server.smtp_port, ["alice@store.example", "bob@store.example"],
                         "[list] news")
            wait_attempt(server, qid, "alice@store.example", "sent")
            wait_attempt(server, qid, "bob@store.example", "sent")
            [line] = [ln for ln in server.log_lines() if f"{qid}: to=<alice@store.example>" in ln]
            assert "relay=localhost[" in line or "relay=127.0.0.1[" in line
            assert len(stored(store, "alice", "lists")) == 1  # Sieve fileinto
            assert stored(store, "alice") == []
            assert len(stored(store, "bob")) == 1
            # Bob's vacation reply, produced by Pigeonhole and submitted to the outside world
            [reply] = outside.wait_for(1, timeout=15)
            assert reply.rcpt_tos == ["sender@remote.example"]
            assert reply.message["Subject"] == "Out of office"
            assert reply.message["Auto-Submitted"] == "auto-replied (vacation)"
            assert "Bob is away" in reply.message.get_payload()
            # mailhaven's own Maildirs stay empty: the store is Dovecot
            assert not (server.maildir("alice") / "new").exists() or \
                not list((server.maildir("alice") / "new").iterdir())
    finally:
        outside.stop()


def test_dovecot_down_deferred_retried_delivered_once(
    tmp_path: Path, mail_server: ServerFactory
) -> None:
    with dovecot_store(tmp_path) as store:
        server = mail_server(settings=settings(store, "unix"))
        store.stop()
        qid = submit(server.smtp_port, ["alice@store.example"], "while down")
        wait_attempt(server, qid, "alice@store.example", "deferred", timeout=30)
        assert stored(store, "alice") == []
        store.start()
        wait_attempt(server, qid, "alice@store.example", "sent", timeout=60)
        server.wait_for_log(rf"{qid}: removed", timeout=30)
        [copy] = stored(store, "alice")
        assert b"Subject: while down" in copy
        assert sum(1 for ln in server.log_lines()
                   if f"{qid}: to=<alice@store.example>" in ln and "status=sent" in ln) == 1


def kill_lmtp_processes(store: DovecotStore) -> None:
    """SIGKILL the lmtp processes of this Dovecot (children of its master, by PID)."""
    assert store.pid is not None
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            comm, _, rest = stat.partition("(")[2].rpartition(")")
            if comm == "lmtp" and int(rest.split()[1]) == store.pid:
                os.kill(int(entry), signal.SIGKILL)


def test_dovecot_killed_after_data_deferred_retried_delivered_once(
    tmp_path: Path, mail_server: ServerFactory
) -> None:
    """Dovecot's lmtp process dies with the whole message sent but the end-of-data line not
    yet read: no recipient got a reply, none was saved. Both are deferred, retried on a new
    connection (Dovecot's master starts a new lmtp process), and stored once each."""
    with dovecot_store(tmp_path) as store:
        with CuttingProxy(("127.0.0.1", store.lmtp_port), "before-replies",
                          on_cut=lambda: kill_lmtp_processes(store)) as proxy:
            server = mail_server(settings=settings(store, "tcp", proxy.port))
            rcpts = ["alice@store.example", "bob@store.example"]
            qid = submit(server.smtp_port, rcpts, "cut after data")
            for rcpt in rcpts:
                wait_attempt(server, qid, rcpt, "deferred", timeout=30)
            assert proxy.cut.is_set()
            for rcpt in rcpts:
                wait_attempt(server, qid, rcpt, "sent", timeout=60)
            server.wait_for_log(rf"{qid}: removed", timeout=30)
            assert proxy.connections >= 2
            assert "killed with signal 9" in store.log()  # Dovecot's master saw it die
        for user in ("alice", "bob"):
            [copy] = stored(store, user)
            assert b"Subject: cut after data" in copy
        for rcpt in rcpts:
            sent = [m for m in attempt_lines(server, qid)
                    if m["to"] == rcpt and m["status"] == "sent"]
            assert len(sent) == 1, rcpt
        assert "Traceback" not in server.log_path.read_text()


def test_connection_lost_after_the_first_reply_retries_only_the_rest(
    tmp_path: Path, mail_server: ServerFactory
) -> None:
    """The session breaks after alice's per-recipient reply: alice is done (sent once, never
    retried); bob's reply was lost, so bob is deferred and retried. Dovecot had saved bob's
    copy already and LMTP (RFC 2033) gives no way to learn that, so bob has two copies: the
    duplicate the protocol makes, as with Postfix's lmtp client; losing mail is the worse."""
    with dovecot_store(tmp_path) as store:
        with CuttingProxy(("127.0.0.1", store.lmtp_port), "after-first-reply") as proxy:
            server = mail_server(settings=settings(store, "tcp", proxy.port))
            qid = submit(server.smtp_port, ["alice@store.example", "bob@store.example"],
                         "cut after one reply")
            wait_attempt(server, qid, "bob@store.example", "deferred", timeout=30)
            wait_attempt(server, qid, "bob@store.example", "sent", timeout=60)
            server.wait_for_log(rf"{qid}: removed", timeout=30)
            assert proxy.cut.is_set()
        alice = [m["status"] for m in attempt_lines(server, qid) if m["to"] == "alice@store.example"]
        assert alice == ["sent"]
        assert len(stored(store, "alice")) == 1
        assert len(stored(store, "bob")) == 2
        assert "Traceback" not in server.log_path.read_text()
