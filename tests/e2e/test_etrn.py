"""End to end: ETRN (RFC 1985) for a part-time host, with fetchmail and with smtplib.

mailhaven holds mail for `parttime.test` (`[etrn] held_domains`); the part-time host's sink at
127.0.0.9 (its MX in our test DNS) gets nothing until someone says `ETRN parttime.test` on
mailhaven's SMTP port. Then mailhaven delivers on a connection of its own (RFC 1985 §3).

Replies checked (RFC 1985 §5): 253 `<n>` pending messages started, 251 no messages waiting,
458 unable to queue (for `#queue` names, which we do not support), 459 node not allowed (not a
part-time domain here, or a client not in `[etrn] clients`).
"""

from __future__ import annotations

import os
import shutil
import smtplib
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.e2e.conftest import ServerFactory
from tests.e2e.send_support import (
    Sink,
    attempt_lines,
    free_port_on,
    relay_settings,
    send,
    wait_attempt,
)
from tests.support.dns_server import DNSServer
from tests.support.server import MailServer

pytestmark = pytest.mark.e2e

PART_TIME_IP = "127.0.0.9"
RECORDS = {
    "parttime.test": {"MX": [(10, "gw.parttime.test")]},
    "sub.parttime.test": {"MX": [(10, "gw.parttime.test")]},
    "gw.parttime.test": {"A": [PART_TIME_IP]},
}


@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink(PART_TIME_IP, free_port_on([PART_TIME_IP])) as running:
        yield running


def etrn_server(
    mail_server: ServerFactory, dns: DNSServer, sink: Sink, clients: list[str] | None = None
) -> MailServer:
    etrn: dict[str, object] = {"held_domains": ["parttime.test", "sub.parttime.test"]}
    if clients is not None:
        etrn["clients"] = clients
    return mail_server(
        settings=relay_settings(dns=dns.address, port=sink.port, etrn=etrn),
    )


def held(server: MailServer, qid: str, to: str, timeout: float = 5.0) -> None:
    """Wait until the spool shows `to` of `qid` on hold (intake holds part-time mail at commit,
    or the scheduler when it routes it; only the latter writes a `status=held` log line)."""
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(f"file:{server.queue_db}?mode=ro", uri=True) as db:
            rows = db.execute(
                "SELECT status, hold FROM recipient WHERE qid = ? AND address = ?", (qid, to)
            ).fetchall()
        if rows and rows[0][0] in ("pending", "deferred") and rows[0][1] != 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{qid} <{to}> not held: {rows}\n{server.log_tail()}")
        time.sleep(0.05)


def etrn(server: MailServer, argument: str, source: str = "127.0.0.1") -> tuple[int, str]:
    with smtplib.SMTP(
        server.host, server.smtp_port, timeout=10, source_address=(source, 0)
    ) as client:
        client.ehlo("gw.parttime.test")
        assert client.has_extn("etrn"), client.esmtp_features
        code, text = client.docmd("ETRN", argument)
        return code, text.decode()


def test_held_until_etrn_then_delivered_smtplib(
    mail_server: ServerFactory, dns: DNSServer, sink: Sink
) -> None:
    server = etrn_server(mail_server, dns, sink)
    q1 = send(server, ["bob@parttime.test"], mark="etrn1")
    q2 = send(server, ["carol@parttime.test", "dave@parttime.test"], mark="etrn2")
    held(server, q1, "bob@parttime.test")
    held(server, q2, "dave@parttime.test")
    time.sleep(1.5)  # more than a backoff period: held mail is not retried on its own
    assert sink.received == [] and sink.rcpt_log == []

    code, text = etrn(server, "parttime.test")
    assert code == 253, text
    # RFC 1985 §5: "253 OK, <n> pending messages for node <x> started"
    assert "pending messages" in text and "parttime.test" in text
    got = sink.wait_for(2)
    assert sorted(r for t in got for r in t.rcpt_tos) == [
        "bob@parttime.test",
        "carol@parttime.test",
        "dave@parttime.test",
    ]
    assert all(t.peer == "127.0.0.1" for t in got)  # a new connection from mailhaven
    for qid, to in ((q1, "bob"), (q2, "carol"), (q2, "dave")):
        [line] = wait_attempt(server, qid, f"{to}@parttime.test", "sent")
        assert line["relay"] == f"gw.parttime.test[{PART_TIME_IP}]:{sink.port}"
        server.wait_for_log(rf"{qid}: removed")

    # nothing left: 251
    code, text = etrn(server, "parttime.test")
    assert code == 251, text


def test_etrn_pending_count_is_messages(
    mail_server: ServerFactory, dns: DNSServer, sink: Sink
) -> None:
    """RFC 1985 §5 counts *messages*: one message with two held recipients is 1 message."""
    server = etrn_server(mail_server, dns, sink)
    qid = send(server, ["carol@parttime.test", "dave@parttime.test"], mark="count")
    held(server, qid, "dave@parttime.test")
    code, text = etrn(server, "parttime.test")
    assert code == 253, text
    assert text.startswith("2.0.0 OK, 1 pending messages for node"), text


def test_etrn_refusals(mail_server: ServerFactory, dns: DNSServer, sink: Sink) -> None:
    server = etrn_server(mail_server, dns, sink, clients=["127.0.0.1/32"])
    qid = send(server, ["bob@parttime.test"], mark="refusals")
    held(server, qid, "bob@parttime.test")

    # not a part-time domain here
    assert etrn(server, "other.test")[0] == 459
    # a client outside [etrn] clients
    assert etrn(server, "parttime.test", source="127.0.0.10")[0] == 459
    # RFC 1985 §5: "#queue" names we cannot run
    assert etrn(server, "#parttime")[0] == 458
    # ETRN inside a mail transaction is a sequence error
    with smtplib.SMTP(server.host, server.smtp_port, timeout=10) as client:
        client.ehlo("gw.parttime.test")
        client.mail("x@localhost")
        assert client.docmd("ETRN", "parttime.test")[0] == 503
    time.sleep(0.5)
    assert sink.received == []  # none of those released anything
    # "@domain" releases the domain and its subdomains
    code, text = etrn(server, "@parttime.test")
    assert code == 253, text
    sink.wait_for(1)


# ------------------------------------------------------------------------------ fetchmail


@pytest.fixture(scope="session")
def fetchmail() -> str:
    path = shutil.which("fetchmail")
    if path is None:
        pytest.skip("fetchmail is not installed")
    return path


def run_fetchmail(fetchmail: str, home: Path, server: MailServer, domains: str) -> tuple[int, str]:
    home.mkdir(exist_ok=True)
    rc = home / "fetchmailrc"
    rc.write_text("# empty: everything is on the command line\n")
    rc.chmod(0o600)
    env = dict(os.environ, HOME=str(home), FETCHMAILHOME=str(home))
    proc = subprocess.run(
        [
            fetchmail, "-f", str(rc), "--nosyslog", "-v", "--protocol", "ETRN",
            "--service", str(server.smtp_port), "--fetchdomains", domains, server.host,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_fetchmail_etrn_releases_held_mail(
    mail_server: ServerFactory, dns: DNSServer, sink: Sink, fetchmail: str, tmp_path: Path
) -> None:
    server = etrn_server(mail_server, dns, sink)
    qid = send(server, ["bob@parttime.test"], mark="fetchmail")
    held(server, qid, "bob@parttime.test")
    assert sink.received == []

    code, out = run_fetchmail(fetchmail, tmp_path / "fm", server, "parttime.test")
    assert "ETRN parttime.test" in out, out
    assert "253 " in out, out
    assert code == 0, out
    [got] = sink.wait_for(1)
    assert got.rcpt_tos == ["bob@parttime.test"]
    wait_attempt(server, qid, "bob@parttime.test", "sent")
    assert [m["status"] for m in attempt_lines(server, qid)] == ["sent"]

    # again: nothing waiting (251); fetchmail says so and still ends normally (exit 0)
    code, out = run_fetchmail(fetchmail, tmp_path / "fm", server, "parttime.test")
    assert "251 " in out and "No messages waiting for parttime.test" in out, out
    assert code == 0, out
