"""End to end: the process life cycle. `kill -9` never loses a message that got its 250;
SIGTERM lets transactions in flight finish; SIGHUP reloads the configuration (or keeps the old
one when the new file is invalid).

The crash test sends a stream of messages from several clients while the server is killed at
pseudo-random moments (a fixed seed, printed on failure), restarts it on the same state, and then
maps every delivered Maildir file back to its queue id through our `Received: ... id <QID>`
trace field.
"""

from __future__ import annotations

import email.utils
import random
import re
import signal
import smtplib
import socket
import sqlite3
import threading
import time
import uuid

import pytest
from tests.e2e.conftest import ServerFactory
from tests.support.server import (
    MailServer,
    RawClient,
    free_port,
    port_listening,
    queue_id_of,
    split_trace,
    to_lf,
)

pytestmark = pytest.mark.e2e

QUEUED = re.compile(r"queued as ([A-Za-z0-9]+)")
SEED = 20240519


def message(mark: str, size: int = 0) -> bytes:
    body = "".join(f"{mark} line {i:05d} " + "z" * 50 + "\r\n" for i in range(size // 70 + 1))
    return (
        f"From: <sender@example.org>\r\nTo: <postmaster@localhost>\r\n"
        f"Subject: crash {mark}\r\nDate: {email.utils.formatdate()}\r\n"
        f"Message-ID: <{mark}@example.org>\r\n\r\n{body}END {mark}\r\n"
    ).encode()


def send(server: MailServer, rcpt: str, data: bytes) -> str:
    with smtplib.SMTP(server.host, server.smtp_port, local_hostname="client.test", timeout=30) as s:
        s.ehlo()
        assert s.mail("sender@example.org")[0] == 250
        assert s.rcpt(rcpt)[0] == 250
        code, text = s.data(data)
        assert code == 250, text
        match = QUEUED.search(text.decode())
        assert match
        return match.group(1)


def transaction(smtp: smtplib.SMTP, data: bytes) -> str:
    """One message on an open connection; the queue id, or SMTPException for any non-2xx."""
    smtp.ehlo_or_helo_if_needed()
    for code, text in (smtp.mail("sender@example.org"), smtp.rcpt("postmaster@localhost")):
        if code != 250:
            raise smtplib.SMTPResponseException(code, text)
    code, text = smtp.data(data)
    if code != 250:
        raise smtplib.SMTPResponseException(code, text)
    match = QUEUED.search(text.decode())
    assert match, text
    return match.group(1)


def queued_rows(server: MailServer, qid: str) -> list[tuple[str, str]]:
    with sqlite3.connect(f"{server.queue_db.as_uri()}?mode=ro", uri=True) as db:
        return db.execute("SELECT address, status FROM recipient WHERE qid = ?", (qid,)).fetchall()


def delivered_by_qid(server: MailServer, user: str) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for path in server.messages(user):
        data = path.read_bytes()
        out.setdefault(queue_id_of(data), []).append(data)
    return out


# ---------------------------------------------------------------------- kill -9


def test_kill_after_250_local_delivery(mail_server: ServerFactory) -> None:
    server = mail_server()
    data = message(uuid.uuid4().hex, 4000)
    qid = send(server, "postmaster@localhost", data)
    server.kill()  # at once: the delivery may or may not have happened
    server.start()
    server.wait_for_log(rf"\b{qid}: removed\b")
    copies = delivered_by_qid(server, "postmaster")[qid]
    # at-least-once: a crash between the Maildir commit and the queue update may duplicate
    assert 1 <= len(copies) <= 2
    for copy in copies:
        assert split_trace(copy)[1] == to_lf(data)


def test_kill_after_250_queued_relay_survives(mail_server: ServerFactory) -> None:
    # remote.example's next hop is a closed loopback port: the message can only wait in the queue
    closed = f"[127.0.0.1]:{free_port()}"
    server = mail_server(settings={"relay": {"transport": {"remote.example": closed}}})
    mark = uuid.uuid4().hex
    qid = send(server, "relay@remote.example", message(mark))
    server.kill()
    assert [address for address, _ in queued_rows(server, qid)] == ["relay@remote.example"]
    server.start()
    server.wait_for_log(r"spool .*: 1 message\(s\) queued, 0 quarantined at start-up", count=1)
    assert [address for address, _ in queued_rows(server, qid)] == ["relay@remote.example"]
    server.stop()
    # and it is still there after a graceful restart too
    server.start()
    server.wait_for_log(r"spool .*: 1 message\(s\) queued, 0 quarantined at start-up", count=2)


def test_kill_at_random_points_loses_nothing(mail_server: ServerFactory) -> None:
    """5 clients send 200 messages while the server is killed with SIGKILL 4 times."""
    server = mail_server()
    rng = random.Random(SEED)
    clients, per_client = 5, 40
    run = uuid.uuid4().hex[:12]
    expected: dict[str, bytes] = {}
    for c in range(clients):
        for i in range(per_client):
            mark = f"{run}-{c}-{i}"
            expected[mark] = message(mark, rng.randrange(500, 60_000))
    acknowledged = send_while_killing(server, rng, expected, clients, run, kills=4)
    assert len(set(acknowledged.values())) == clients * per_client

    # every acknowledged message is delivered, complete; nothing partial appears
    deadline = time.monotonic() + 30
    while True:
        delivered = delivered_by_qid(server, "postmaster")
        missing = set(acknowledged) - set(delivered)
        if not missing:
            break
        assert time.monotonic() < deadline, (
            f"seed {SEED}: {len(missing)} lost: {sorted(missing)[:5]}"
        )
        time.sleep(0.05)
    for qid, files in delivered.items():
        for data in files:
            found = re.search(rb"Message-ID: <([0-9a-f]+-\d+-\d+)@example\.org>", data)
            assert found, f"seed {SEED}: {qid}: delivered file without our Message-ID"
            mark = found.group(1).decode()
            assert split_trace(data)[1] == to_lf(expected[mark]), f"seed {SEED}: {qid} damaged"
            if qid in acknowledged:
                assert acknowledged[qid] == mark
    assert list(server.maildir("postmaster").glob("new/*"))  # the check above looked at files


# ---------------------------------------------------------------------- SIGTERM


def test_sigterm_lets_transactions_in_flight_finish(mail_server: ServerFactory) -> None:
    server = mail_server(settings={"timeouts": {"shutdown_grace": 3.0}})
    mark = uuid.uuid4().hex
    data = message(mark, 2000)
    busy = RawClient(server.host, server.smtp_port)
    idle = RawClient(server.host, server.smtp_port)
    stalled = RawClient(server.host, server.smtp_port)
    try:
        for client in (busy, idle, stalled):
            assert client.reply()[0] == 220
            assert client.command("EHLO client.test")[0] == 250
        for client in (busy, stalled):
            assert client.command("MAIL FROM:<sender@example.org>")[0] == 250
            assert client.command("RCPT TO:<postmaster@localhost>")[0] == 250
            assert client.command("DATA")[0] == 354
            client.send(data[:1000])
        server.signal(signal.SIGTERM)
        server.wait_for_log(r"stopping: finishing transactions in flight")
        started = time.monotonic()
        # the idle session is told at once; no new connections are taken
        code, text = idle.reply()
        assert code == 421 and text[0].startswith("4.3.2"), text
        deadline = time.monotonic() + 5
        while port_listening(server.smtp_port):
            assert time.monotonic() < deadline, "still listening after SIGTERM"
            time.sleep(0.02)
        with pytest.raises(OSError):
            socket.create_connection((server.host, server.smtp_port), timeout=2).close()
        # the busy one finishes its message and gets 250, then 421
        busy.send(data[1000:] + b".\r\n")
        code, text = busy.reply()
        assert code == 250, text
        qid = QUEUED.search(text[0])
        assert qid
        busy.send(b"NOOP\r\n")
        code, text = busy.reply()
        assert code == 421 and text[0].startswith("4.3.2"), text
        assert busy.is_closed_by_peer()
        # the stalled one is cut when the grace period ends
        code, text = stalled.reply()
        assert code == 421, text
        assert server.wait_exit(10) == 0
        assert time.monotonic() - started < 3.0 + 3.0
    finally:
        for client in (busy, idle, stalled):
            client.close()
    assert server.log_lines()[-1].endswith("stopped")
    # the acknowledged message is delivered (now, or after the restart)
    server.start()
    server.wait_for_log(rf"\b{qid.group(1)}: removed\b")
    copies = delivered_by_qid(server, "postmaster")[qid.group(1)]
    assert [split_trace(c)[1] for c in copies] == [to_lf(data)]


# ---------------------------------------------------------------------- SIGHUP


def test_sighup_reload(mail_server: ServerFactory) -> None:
    server = mail_server(settings={"local_users": ["postmaster"]})
    pid = server.pid

    def rcpt(address: str) -> int:
        with smtplib.SMTP(server.host, server.smtp_port, "client.test", 10) as s:
            s.ehlo()
            s.mail("sender@example.org")
            return s.rcpt(address)[0]

    assert rcpt("newbie@localhost") == 550
    # an invalid file: logged, old configuration kept
    good = server.config_path.read_text()
    server.write_config(good + "\n[limits]\nrecipients = 5\n")  # below RFC 5321's minimum
    server.reload()
    line = server.wait_for_log(r"reload: refused, keeping the old configuration \(nothing applied\): .*recipients")[0]
    assert "4.5.3.1.8" in line.string
    server.write_config("hostname = \n")  # TOML syntax error
    server.reload()
    server.wait_for_log(r"reload: refused, keeping the old configuration \(nothing applied\): .*TOML syntax error", count=1)
    assert rcpt("newbie@localhost") == 550
    assert rcpt("postmaster@localhost") == 250
    # a valid file with a new user applies without a restart
    server.update_config({"local_users": ["postmaster", "newbie"]})
    server.reload()
    server.wait_for_log(r"reload: configuration .* applied")
    assert rcpt("newbie@localhost") == 250
    qid = send(server, "newbie@localhost", message(uuid.uuid4().hex))
    assert qid in delivered_by_qid_wait(server, "newbie", qid)
    assert server.pid == pid and server.running


def delivered_by_qid_wait(server: MailServer, user: str, qid: str) -> dict[str, list[bytes]]:
    deadline = time.monotonic() + 10
    while qid not in (found := delivered_by_qid(server, user)):
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.02)
    return found


def send_while_killing(
    server: MailServer, rng: random.Random, expected: dict[str, bytes], clients: int, run: str,
    *, kills: int,
) -> dict[str, str]:  # fmt: skip
    """`clients` threads send the `expected` messages (marks `run-<client>-<i>`), each client
    reconnecting and resending after any failure (a kill mid-session, a refusal while down, a
    4xx), while the server is SIGKILLed and restarted `kills` times at random points of the
    stream. Returns queue id -> mark for every 250 a client saw."""
    per_client = len(expected) // clients
    acknowledged: dict[str, str] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(c: int) -> None:
        deadline = time.monotonic() + 60
        smtp: smtplib.SMTP | None = None
        try:
            for i in range(per_client):
                mark = f"{run}-{c}-{i}"
                while True:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"client {c} stuck at message {i}")
                    try:
                        if smtp is None:
                            smtp = smtplib.SMTP(server.host, server.smtp_port, "client.test", 10)
                        qid = transaction(smtp, expected[mark])
                    except (OSError, smtplib.SMTPException):
                        if smtp is not None:
                            smtp.close()
                        smtp = None
                        time.sleep(0.02)
                        continue
                    with lock:
                        acknowledged[qid] = mark
                    break
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            if smtp is not None:
                smtp.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    done = 0
    try:
        # kill when the stream has reached random points, plus a random few milliseconds (so
        # the kill lands in any phase: between commands, mid-DATA, mid-commit, mid-delivery)
        for threshold in sorted(rng.sample(range(10, len(expected) - 20), kills)):
            deadline = time.monotonic() + 30
            while len(acknowledged) < threshold:
                assert time.monotonic() < deadline, f"stream stalled at {len(acknowledged)}"
                time.sleep(0.001)
            time.sleep(rng.uniform(0, 0.02))
            server.kill()
            done += 1
            server.start()
    finally:
        for thread in threads:
            thread.join(90)
    assert not errors, errors
    assert done == kills
    return acknowledged
