"""End to end: a damaged `queue.db` (issue 16, item 16). The server starts anyway in a safe
mode: the damaged file is moved aside, the queue rebuilt from the spool files, and the log
says so; `mailhaven queue salvage` does the same with the daemon stopped (postsuper -s)."""

from __future__ import annotations

import json
import smtplib

import pytest
from tests.e2e.conftest import ServerFactory
from tests.support.server import MailServer

pytestmark = pytest.mark.e2e

BIG = 300 * 1024  # over the spool's inline limit: the body is a file ending in its envelope record


def _send(server: MailServer, marker: str, size: int) -> str:
    body = f"Subject: {marker}\r\n\r\n".encode() + b"z" * 70 + b"\r\n"
    body += (b"y" * 76 + b"\r\n") * (size // 78)
    with smtplib.SMTP(server.host, server.smtp_port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("sender@client.test")
        smtp.rcpt("someone@example.org")  # relayed; the DNS never answers: stays queued
        code, reply = smtp.data(body)
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[-1]


def _listed(server: MailServer) -> dict[str, str]:
    shown = server.queue_cli("list", "--json")
    assert shown.returncode == 0, shown.stderr
    return {m["queue_id"]: m["sender"] for m in map(json.loads, shown.stdout.splitlines())}


def _smash(server: MailServer) -> None:
    """Overwrite the headers of the database and of its WAL (if any): SQLite then cannot
    even open it."""
    for path in (server.queue_db, server.queue_db.with_name("queue.db-wal")):
        if path.exists():
            with open(path, "r+b") as f:
                f.write(b"\xff" * 100)


@pytest.fixture
def queued(mail_server: ServerFactory) -> tuple[MailServer, str]:
    server = mail_server(
        settings={"local_users": ["postmaster"], "timeouts": {"shutdown_grace": 1.0}}
    )
    big = _send(server, "big", BIG)
    assert big in _listed(server)
    server.stop()
    _smash(server)
    return server, big


def test_a_damaged_queue_db_is_rebuilt_at_start(queued: tuple[MailServer, str]) -> None:
    server, big = queued
    server.start()  # before: exit 1 with a raw sqlite3 traceback
    log = server.log()
    assert "queue.db is damaged" in log and "queue rebuilt" in log, log
    assert "Traceback" not in log, log
    assert _listed(server) == {big: "sender@client.test"}
    assert list(server.state_dir.joinpath("spool").glob("damaged-*/queue.db"))
    assert _send(server, "after", 1000)  # and it serves again


def test_queue_salvage_rebuilds_with_the_daemon_stopped(queued: tuple[MailServer, str]) -> None:
    server, big = queued
    done = server.queue_cli("salvage")
    assert done.returncode == 0, done.stderr
    assert "queue.db is damaged" in done.stdout and "1 from body files" in done.stdout
    assert _listed(server) == {big: "sender@client.test"}
    again = server.queue_cli("salvage")
    assert again.returncode == 0 and "queue.db is sound" in again.stdout, again
    server.start()
    assert "queue.db is damaged" not in server.log()
    assert _listed(server) == {big: "sender@client.test"}


def test_a_body_file_damaged_to_the_same_size_is_held_not_sent(
    mail_server: ServerFactory,
) -> None:
    """Issue 16, item 23: the stored CRC is checked before a delivery reads the body."""
    server = mail_server(
        settings={"local_users": ["postmaster"], "timeouts": {"shutdown_grace": 1.0}}
    )
    qid = _send(server, "damaged", BIG)
    server.stop()
    body = server.state_dir / "spool" / "bodies" / qid
    with open(body, "r+b") as f:  # same size, different bytes
        f.seek(BIG // 2)
        f.write(b"X")
    server.start()
    assert server.queue_cli("flush").returncode == 0
    server.wait_for_log(f"{qid}: quarantined: body file does not match its checksum")
    shown = server.queue_cli("list", "--json")
    [entry] = [json.loads(line) for line in shown.stdout.splitlines()]
    assert entry["queue_id"] == qid
    assert "status=sent" not in server.log()
