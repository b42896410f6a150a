"""End to end: mail for local mailboxes only goes into the Maildirs before the 250
(`[mailbox] delivery = "direct"`, the default; `mailhaven.scheduler.direct`).

Real clients (smtplib, Postfix's smtp-source) against a real `mailhaven serve`: the copies are
in `new/` when the 250 arrives and the queue was never written; each copy is the one the
queued path delivers; the log tells the same story in the same lines; a recipient whose copy
fails is queued alone; it works with worker processes; and a SIGKILL under load never loses
nor duplicates a message that got its 250.
"""

from __future__ import annotations

import random
import re
import shutil
import smtplib
import sqlite3
import subprocess
import time
import uuid

import pytest
from tests.e2e.conftest import ServerFactory
from tests.e2e.test_crash import message, send_while_killing
from tests.support.server import MailServer, free_port, queue_id_of, split_trace, to_lf

pytestmark = pytest.mark.e2e

QUEUED = re.compile(r"queued as ([A-Za-z0-9]+)")
SEED = 20261204
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SETTINGS = {
    "local_users": ["postmaster", "alice", "bob"],
    "aliases": {"team": ["alice", "bob"]},
}


def send_one(server: MailServer, rcpts: list[str], data: bytes) -> str:
    with smtplib.SMTP(server.host, server.smtp_port, "client.test", timeout=30) as s:
        s.ehlo()
        assert s.mail("sender@example.org")[0] == 250
        for rcpt in rcpts:
            assert s.rcpt(rcpt)[0] == 250
        code, text = s.data(data)
        assert code == 250, text
    found = QUEUED.search(text.decode())
    assert found
    return found.group(1)


def lines_of(server: MailServer, qid: str) -> list[str]:
    return [line.split(": ", 1)[1] for line in server.log_lines() if f" {qid}: " in line]


def test_copies_are_in_new_at_the_250_and_the_queue_is_never_written(
    mail_server: ServerFactory,
) -> None:
    server = mail_server(settings=SETTINGS)
    mark = uuid.uuid4().hex
    data = message(mark, 3000)
    qid = send_one(server, ["team@localhost", "postmaster@localhost"], data)
    # no waiting: the 250 came after every copy was durable in new/
    for user in ("alice", "bob", "postmaster"):
        [path] = server.messages(user)
        assert path.parent.name == "new"
        fields, rest = split_trace(path.read_bytes())
        assert rest == to_lf(data)
        assert fields[0] == b"Return-Path: <sender@example.org>"
        assert fields[1] == f"Delivered-To: {user}@localhost".encode()
        assert queue_id_of(path.read_bytes()) == qid
    assert server.queued_messages() == 0
    story = lines_of(server, qid)
    [arrival] = [i for i, line in enumerate(story) if line.startswith(f"{qid}: from=<")]
    sent = [i for i, line in enumerate(story) if ", relay=local, " in line
            and "status=sent (delivered to maildir)" in line]
    assert len(sent) == 3 and min(sent) > arrival
    assert story[-1] == f"{qid}: removed"
    assert "orig_to=<team@localhost>" in "".join(story[i] for i in sent)


def test_the_same_bytes_as_the_queued_path(mail_server: ServerFactory) -> None:
    direct = mail_server(settings=SETTINGS)
    queued = mail_server(settings={**SETTINGS, "mailbox": {"delivery": "queued"}})
    data = message(uuid.uuid4().hex, 500)
    copies = []
    for server in (direct, queued):
        qid = send_one(server, ["alice@localhost"], data)
        [path] = server.wait_for_messages("alice", 1)
        text = path.read_bytes()
        # only the queue id and the time in our Received: field differ
        text = text.replace(qid.encode(), b"QID")
        copies.append(re.sub(rb"; [^\n]+\n", b"; DATE\n", text, count=1))
        assert f"{qid}: to=<alice@localhost>, relay=local," in direct.log() + queued.log()
    assert copies[0] == copies[1]
    assert direct.queued_messages() == 0


def test_a_full_mailbox_is_queued_for_that_recipient_alone(mail_server: ServerFactory) -> None:
    server = mail_server(settings={**SETTINGS, "quota": {"users": {"bob": "storage=1k"}}})
    qid = send_one(server, ["alice@localhost", "bob@localhost"], message("q", 4000))
    assert len(server.messages("alice")) == 1 and server.messages("bob") == []
    with sqlite3.connect(f"{server.queue_db.as_uri()}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT address FROM recipient WHERE qid = ?", (qid,)).fetchall()
    assert rows == [("bob@localhost",)]
    server.wait_for_log(rf"{qid}: direct delivery for <bob@localhost> failed, queued: 452 4\.2\.2")
    server.wait_for_log(rf"{qid}: to=<bob@localhost>, relay=local, .*status=deferred")


def test_a_message_with_a_remote_recipient_is_queued_whole(mail_server: ServerFactory) -> None:
    closed = f"[127.0.0.1]:{free_port()}"  # nothing listens: the remote copy waits, deferred
    server = mail_server(settings={**SETTINGS, "relay": {"transport": {"remote.example": closed}}})
    qid = send_one(server, ["alice@localhost", "carol@remote.example"], message("mixed", 200))
    server.wait_for_log(rf"{qid}: to=<alice@localhost>, relay=local, .*status=sent")
    server.wait_for_log(rf"{qid}: to=<carol@remote.example>, .*status=deferred")
    with sqlite3.connect(f"{server.queue_db.as_uri()}?mode=ro", uri=True) as db:
        rows = {a for (a,) in db.execute("SELECT address FROM recipient WHERE qid = ?", (qid,))}
    assert rows == {"alice@localhost", "carol@remote.example"}  # the local one was queued too
    assert len(server.messages("alice")) == 1


def test_swaks(mail_server: ServerFactory, swaks: str) -> None:
    server = mail_server(settings=SETTINGS)
    mark = uuid.uuid4().hex
    done = subprocess.run(
        [swaks, "--server", f"{server.host}:{server.smtp_port}", "--from", "s@example.org",
         "--to", "team@localhost", "--header", f"Subject: {mark}", "--body", mark],
        check=False, timeout=60, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for user in ("alice", "bob"):  # at swaks' exit, already there
        [path] = server.messages(user)
        assert mark.encode() in path.read_bytes()
    assert server.queued_messages() == 0


def test_smtp_source_with_worker_processes(mail_server: ServerFactory) -> None:
    if not shutil.which(SMTP_SOURCE):
        pytest.skip("smtp-source (postfix) is not installed")
    server = mail_server(settings={**SETTINGS, "smtp_processes": 2})
    server.wait_for_log(r"worker 1 ready on 1 smtp socket", timeout=15)
    count = 300
    subprocess.run(
        [SMTP_SOURCE, "-s", "5", "-m", str(count), "-l", "1024", "-f", "sender@example.org",
         "-t", "postmaster@localhost", "-M", "client.test",
         f"{server.host}:{server.smtp_port}"],
        check=True, timeout=120, capture_output=True,
    )
    # smtp-source returned after its last 250: every copy is there already
    assert len(server.messages("postmaster")) == count
    qids = {queue_id_of(p.read_bytes()) for p in server.messages("postmaster")}
    assert len(qids) == count
    assert server.queued_messages() == 0  # the daemon's shard
    pids = {m.group(1) for m in re.finditer(r"mailhaven/qmgr\[(\d+)\]: \w+: removed", server.log())}
    assert len(pids) == 2  # both processes delivered directly


def test_kill_under_load_loses_and_duplicates_nothing_acknowledged(
    mail_server: ServerFactory,
) -> None:
    """5 clients send 150 messages while the server is SIGKILLed 3 times: every message that
    got its 250 is in the Maildir exactly once (a copy made before a kill that the client never
    saw acknowledged is a copy of its own, under the queue id of that unacknowledged try)."""
    server = mail_server()
    rng = random.Random(SEED)
    clients, per_client = 5, 30
    run = uuid.uuid4().hex[:12]
    expected = {f"{run}-{c}-{i}": message(f"{run}-{c}-{i}", rng.randrange(200, 40_000))
                for c in range(clients) for i in range(per_client)}
    acknowledged = send_while_killing(server, rng, expected, clients, run, kills=3)
    assert len(set(acknowledged.values())) == clients * per_client
    deadline = time.monotonic() + 30
    while server.queued_messages():  # nothing should be queued; if so, let it finish
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.05)
    by_qid: dict[str, list[bytes]] = {}
    for path in server.messages("postmaster"):
        data = path.read_bytes()
        by_qid.setdefault(queue_id_of(data), []).append(data)
    for qid, mark in acknowledged.items():
        copies = by_qid.get(qid, [])
        assert len(copies) == 1, f"seed {SEED}: {qid} ({mark}): {len(copies)} copies"
        assert split_trace(copies[0])[1] == to_lf(expected[mark]), f"seed {SEED}: {qid} damaged"
    for qid, copies in by_qid.items():  # unacknowledged tries: whole copies, never partial
        for data in copies:
            found = re.search(rb"Message-ID: <([0-9a-f]+-\d+-\d+)@example\.org>", data)
            assert found, qid
            assert split_trace(data)[1] == to_lf(expected[found.group(1).decode()])
