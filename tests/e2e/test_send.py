"""End to end: sending mail to other hosts, over real sockets on loopback.

A DNS server of our own (`tests.support.dns_server`) answers MX/A queries with loopback
addresses (127.0.0.2, 127.0.0.3, ...) where recording aiosmtpd sinks listen on one common port
(mailhaven's `[relay] port`). mailhaven runs as a real `mailhaven serve` subprocess with short
retry times (`minimal_backoff = 1`, `maximal_backoff = 2`) instead of a fake clock.

Shown here: MX fallback; deferral and retry until a host comes up; bounces (RFC 3464, read with
the stdlib `email` package) in the local sender's mailbox for 5xx, expiry and null MX; mixed
per-recipient results in one transaction; relaying through a smarthost that requires STARTTLS
(certificate verified against a trustme CA) and AUTH; and at-least-once delivery when the
server is SIGKILLed between the remote 250 and the durable record. Every test also checks the
Postfix-shaped maillog lines (`QID: to=<..>, relay=.., delay=.., delays=a/b/c/d, dsn=..,
status=.. (..)` and `QID: removed`).
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from tests.e2e.conftest import ServerFactory
from tests.e2e.send_support import (
    Received,
    Sink,
    attempt_lines,
    check_delays,
    free_port_on,
    read_dsn,
    recipient_group,
    relay_settings,
    send,
    wait_attempt,
)
from tests.support.dns_server import DNSServer

pytestmark = pytest.mark.e2e

HOSTS = {
    "mx1.two.test": "127.0.0.2",  # never listens: connection refused
    "mx2.two.test": "127.0.0.3",
    "mx.down.test": "127.0.0.4",  # comes up late
    "mx.mixed.test": "127.0.0.5",
    "mx.slow.test": "127.0.0.6",  # 450 for everyone
    "mx.crash.test": "127.0.0.7",
    "smarthost.test": "127.0.0.8",
    "mx.flush.test": "127.0.0.9",  # down, then up: `queue flush` retries it at once
}
RECORDS = {
    "two.test": {"MX": [(10, "mx1.two.test"), (20, "mx2.two.test")]},
    "down.test": {"MX": [(10, "mx.down.test")]},
    "mixed.test": {"MX": [(10, "mx.mixed.test")]},
    "slow.test": {"MX": [(10, "mx.slow.test")]},
    "crash.test": {"MX": [(10, "mx.crash.test")]},
    "nullmx.test": {"MX": [(0, ".")]},
    "flush.test": {"MX": [(10, "mx.flush.test")]},
    **{name: {"A": [ip]} for name, ip in HOSTS.items()},
}


@pytest.fixture(scope="module")
def port() -> int:
    """The remote SMTP port: free on every sink address."""
    return free_port_on(sorted(set(HOSTS.values())))


@pytest.fixture
def sinks() -> Iterator[list[Sink]]:
    made: list[Sink] = []
    yield made
    for sink in made:
        sink.stop()


def sink_for(sinks: list[Sink], host: str, port: int, **kwargs: object) -> Sink:
    sink = Sink(HOSTS[host], port, **kwargs)  # type: ignore[arg-type]
    sinks.append(sink)
    return sink


def wait_removed(server: object, qid: str, timeout: float = 10.0) -> None:
    server.wait_for_log(rf"\b{qid}: removed$", timeout=timeout)  # type: ignore[attr-defined]


def bounce_for(server: object, qid: str) -> Path:
    """The one DSN about `qid` in alice's Maildir (the report names the original queue id)."""
    for path in server.wait_for_messages("alice", 1):  # type: ignore[attr-defined]
        if qid.encode() in path.read_bytes():
            return path
    raise AssertionError(f"no bounce about {qid} in alice's mailbox")


# ------------------------------------------------------------------------------ MX fallback


def test_first_mx_down_second_mx_used(
    mail_server: ServerFactory, dns: DNSServer, port: int, sinks: list[Sink]
) -> None:
    mx2 = sink_for(sinks, "mx2.two.test", port).start()
    server = mail_server(settings=relay_settings(dns=dns.address, port=port))
    qid = send(server, ["bob@two.test"])

    [got] = mx2.wait_for(1)
    assert got.rcpt_tos == ["bob@two.test"]
    assert got.mail_from == "alice@localhost"
    assert b"send test m1" in got.content and f"id {qid}".encode() in got.content
    [line] = wait_attempt(server, qid, "bob@two.test", "sent")
    assert line["relay"] == f"mx2.two.test[127.0.0.3]:{port}"
    assert line["dsn"].startswith("2.")
    check_delays(line)
    wait_removed(server, qid)
    # the refused first MX is logged, and it never produced a delivery line of its own
    server.wait_for_log(rf"{qid}: connect to mx1\.two\.test\[127\.0\.0\.2\]:{port}")
    assert [m["status"] for m in attempt_lines(server, qid)] == ["sent"]
    assert ("mx1.two.test", "A", "udp") in dns.queries or any(
        q[0] == "mx1.two.test" for q in dns.queries
    )


def test_all_mx_down_deferred_then_retried_and_delivered(
    mail_server: ServerFactory, dns: DNSServer, port: int, sinks: list[Sink]
) -> None:
    """Backoff 1..2 s: after the host comes up the next retry (within ~2 s) delivers."""
    late = sink_for(sinks, "mx.down.test", port)  # not started: connection refused
    server = mail_server(settings=relay_settings(dns=dns.address, port=port))
    qid = send(server, ["bob@down.test"])

    [deferred] = wait_attempt(server, qid, "bob@down.test", "deferred")
    assert deferred["dsn"].startswith("4.")
    assert deferred["relay"] == "none"  # no connection: Postfix logs relay=none
    check_delays(deferred)
    late.start()
    started = time.monotonic()
    [got] = late.wait_for(1, timeout=8)
    assert got.rcpt_tos == ["bob@down.test"]
    # per schedule: the retry waited at most maximal_backoff (plus scheduling slack)
    assert time.monotonic() - started < 5
    [sent] = wait_attempt(server, qid, "bob@down.test", "sent")
    assert float(sent["delay"]) >= 1.0  # it sat in the queue for at least one backoff
    wait_removed(server, qid)


def test_queue_flush_retries_a_destination_that_was_just_down(
    mail_server: ServerFactory, dns: DNSServer, port: int, sinks: list[Sink]
) -> None:
    """Postfix's `postqueue -f` forgets the dead-destination state: after the outage, a flush
    connects at once instead of logging `delivery temporarily suspended` until the
    dead-destination timer (= minimal_backoff, 300 s here) runs out."""
    late = sink_for(sinks, "mx.flush.test", port)  # not started: connection refused
    server = mail_server(
        settings=relay_settings(
            dns=dns.address, port=port, minimal_backoff=300, maximal_backoff=600
        )
    )
    qid = send(server, ["bob@flush.test"])
    wait_attempt(server, qid, "bob@flush.test", "deferred")
    late.start()
    flushed = server.queue_cli("flush")
    assert flushed.returncode == 0, flushed.stderr
    assert "1 recipient(s) made due now" in flushed.stdout
    [got] = late.wait_for(1, timeout=8)
    assert got.rcpt_tos == ["bob@flush.test"]
    wait_attempt(server, qid, "bob@flush.test", "sent")
    assert "suspended" not in "".join(m.group(0) for m in attempt_lines(server, qid))


# ------------------------------------------------------------------------------ bounces


def test_permanent_failure_bounces_to_local_sender(
    mail_server: ServerFactory, dns: DNSServer, port: int, sinks: list[Sink]
) -> None:
    sink_for(
        sinks, "mx.mixed.test", port, rcpt_replies={"nobody@mixed.test": "550 5.1.1 No such user"}
    ).start()
    server = mail_server(settings=relay_settings(dns=dns.address, port=port))
    qid = send(server, ["nobody@mixed.test"], mark="perm")

    [line] = wait_attempt(server, qid, "nobody@mixed.test", "bounced")
    assert line["dsn"] == "5.1.1"
    assert line["relay"] == f"mx.mixed.test[127.0.0.5]:{port}"
    assert line["text"] == (  # Postfix smtp(8)'s shape: who said what, to which command
        "host mx.mixed.test[127.0.0.5] said: 550 5.1.1 No such user (in reply to RCPT TO command)"
    )
    check_delays(line)
    wait_removed(server, qid)

    dsn = read_dsn(bounce_for(server, qid))
    assert dsn.message["To"] and "alice@localhost" in dsn.message["To"]
    group = recipient_group(dsn, "nobody@mixed.test")
    assert group["Final-Recipient"].lower() == "rfc822; nobody@mixed.test"
    assert group["Action"] == "failed"
    assert group["Status"] == "5.1.1"
    assert "mx.mixed.test" in (group["Remote-MTA"] or "")
    assert "550" in group["Diagnostic-Code"] and "smtp;" in group["Diagnostic-Code"].lower()
    assert dsn.original is not None and "send test perm" in dsn.original["Subject"]
    # the bounce itself went out with the null sender
    raw = bounce_for(server, qid).read_bytes()
    assert b"Return-Path: <>" in raw


def test_success_notice_says_relayed_when_the_next_hop_has_no_dsn(
    mail_server: ServerFactory, dns: DNSServer, port: int, sinks: list[Sink]
) -> None:
    """Issue 16 #4, the other half: a next hop without DSN cannot report delivery, so NOTIFY
    stays with us and the sender gets our "relayed" notice (RFC 3461 §4.1)."""
    sink = sink_for(sinks, "mx.mixed.test", port).start()
    server = mail_server(settings=relay_settings(dns=dns.address, port=port))
    qid = send(server, ["someone@mixed.test"], mark="notify", rcpt_options=["NOTIFY=SUCCESS"])
    [got] = sink.wait_for(1)
    assert got.rcpt_tos == ["someone@mixed.test"]
    wait_removed(server, qid)
    dsn = read_dsn(bounce_for(server, qid))
    assert dsn.per_message["Reporting-MTA"] == "dns; mx.test"  # ours: the sink cannot report
    group = recipient_group(dsn, "someone@mixed.test")
    assert group["Action"] == "relayed" and group["Remote-MTA"] == "dns; mx.mixed.test"


def test_bounces_to_one_sender_are_rate_limited(
    mail_server: ServerFactory, dns: DNSServer, port: int, sinks: list[Sink]
) -> None:
    """Issue 16 #23: `queue.notice_rate_limit` caps the notices one address gets (backscatter);
    the surplus is logged and never queued."""
    refuse = {"nobody@mixed.test": "550 5.1.1 No such user"}
    sink_for(sinks, "mx.mixed.test", port, rcpt_replies=refuse).start()
    settings = relay_settings(dns=dns.address, port=port)
    settings["queue"]["notice_rate_limit"] = 1
    server = mail_server(settings=settings)
    first = send(server, ["nobody@mixed.test"], mark="bs1")
    wait_removed(server, first)
    second = send(server, ["nobody@mixed.test"], mark="bs2")
    server.wait_for_log(
        rf"\b{second}: sender non-delivery notification to <alice@localhost> suppressed"
    )
    wait_removed(server, second)
    bounce_for(server, first)  # the first one did go out
    assert not re.search(rf"\b{second}: sender non-delivery notification: ", server.log())


def test_mixed_results_in_one_transaction(
    mail_server: ServerFactory, dns: DNSServer, port: int, sinks: list[Sink]
) -> None:
    """250/450/550 in one transaction: 250 sent, 550 bounced (only it in the DSN), 450
    retried later on its own and delivered."""
    sink = sink_for(
        sinks,
        "mx.mixed.test",
        port,
        rcpt_replies={
            "later@mixed.test": "450 4.2.1 Mailbox busy, try later",
            "nobody@mixed.test": "550 5.1.1 No such user",
        },
    ).start()
    server = mail_server(settings=relay_settings(dns=dns.address, port=port))
    rcpts = ["ok@mixed.test", "later@mixed.test", "nobody@mixed.test"]
    qid = send(server, rcpts, mark="mixed")

    [first] = sink.wait_for(1)
    assert first.rcpt_tos == ["ok@mixed.test"]
    # all three RCPTs were in that one transaction
    assert [a for a, _ in sink.rcpt_log[:3]] == rcpts
    assert [c for _, c in sink.rcpt_log[:3]] == [250, 450, 550]
    [deferred] = wait_attempt(server, qid, "later@mixed.test", "deferred")
    assert deferred["dsn"] == "4.2.1" and "Mailbox busy" in deferred["text"]
    sink.rcpt_replies.pop("later@mixed.test")  # the mailbox is free now

    second = sink.wait_for(2, timeout=8)[1]
    assert second.rcpt_tos == ["later@mixed.test"]
    wait_attempt(server, qid, "later@mixed.test", "sent")
    wait_removed(server, qid)
    by_rcpt = {(m["to"], m["status"]) for m in attempt_lines(server, qid)}
    assert by_rcpt == {
        ("ok@mixed.test", "sent"),
        ("later@mixed.test", "deferred"),
        ("later@mixed.test", "sent"),
        ("nobody@mixed.test", "bounced"),
    }
    # ok@ was not delivered twice, nobody@ was not retried
    assert sink.delivered_to().count("ok@mixed.test") == 1
    assert [a for a, _ in sink.rcpt_log].count("nobody@mixed.test") == 1

    dsn = read_dsn(bounce_for(server, qid))
    assert [g["Final-Recipient"].split(";")[1].strip() for g in dsn.per_recipient] == [
        "nobody@mixed.test"
    ]
    group = recipient_group(dsn, "nobody@mixed.test")
    assert group["Action"] == "failed" and group["Status"].startswith("5.")


def test_lifetime_exceeded_expired_bounce(
    mail_server: ServerFactory, dns: DNSServer, port: int, sinks: list[Sink]
) -> None:
    """`lifetime = 3`: 450 at every attempt, then the sender gets an expiry DSN (failed, 5.x.x
    from the last 4.x.x reply)."""
    sink = sink_for(
        sinks, "mx.slow.test", port, rcpt_replies={"bob@slow.test": "450 4.2.2 Over quota"}
    ).start()
    server = mail_server(settings=relay_settings(dns=dns.address, port=port, lifetime=3))
    qid = send(server, ["bob@slow.test"], mark="expire")

    server.wait_for_log(
        rf"{qid}: from=<alice@localhost>, status=expired, returned to sender", timeout=12
    )
    lines = attempt_lines(server, qid)
    assert len(lines) >= 2, "retried at least once before giving up"
    assert all(m["dsn"] == "4.2.2" and m["status"] == "deferred" for m in lines)
    assert float(lines[-1]["delay"]) >= 3.0
    assert sink.received == []
    wait_removed(server, qid)

    dsn = read_dsn(bounce_for(server, qid))
    group = recipient_group(dsn, "bob@slow.test")
    assert group["Action"] == "failed"
    assert group["Status"] == "5.2.2"
    assert "Over quota" in (group["Diagnostic-Code"] or "")


def test_null_mx_bounces_at_once(
    mail_server: ServerFactory, dns: DNSServer, port: int
) -> None:
    server = mail_server(settings=relay_settings(dns=dns.address, port=port))
    sent_at = time.monotonic()
    qid = send(server, ["bob@nullmx.test"], mark="nullmx")

    [line] = wait_attempt(server, qid, "bob@nullmx.test", "bounced", timeout=5)
    assert line["dsn"] == "5.1.10"
    assert line["relay"] == "none"
    wait_removed(server, qid)
    dsn = read_dsn(bounce_for(server, qid))
    assert time.monotonic() - sent_at < 5  # no deferral, no retry
    group = recipient_group(dsn, "bob@nullmx.test")
    assert group["Action"] == "failed" and group["Status"] == "5.1.10"
    assert len(attempt_lines(server, qid)) == 1


# ------------------------------------------------------------------------------ smarthost


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    authority = trustme.CA()
    pem = tmp_path_factory.mktemp("ca") / "ca.pem"
    authority.cert_pem.write_to_path(str(pem))
    return authority, pem


def smarthost_sink(
    sinks: list[Sink], port: int, authority: trustme.CA, **kwargs: object
) -> Sink:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.8", "smarthost.test").configure_cert(ctx)
    return sink_for(
        sinks, "smarthost.test", port, tls_context=ctx, credentials=("relayuser", "s3cret"),
        **kwargs,
    )


def smarthost_server(
    mail_server: ServerFactory, dns: DNSServer, port: int, ca_file: Path | None, password: str
) -> object:
    env = dict(os.environ)
    env.pop("SSL_CERT_DIR", None)
    if ca_file is not None:  # relayhost_tls = verify checks against the default roots
        env["SSL_CERT_FILE"] = str(ca_file)
    return mail_server(
        settings=relay_settings(
            dns=dns.address,
            port=port,
            relayhost=f"[127.0.0.8]:{port}",
            relay={
                "relayhost_tls": "verify",
                "relayhost_username": "relayuser",
                "relayhost_password": password,
            },
        ),
        env=env,
    )


def test_smarthost_with_starttls_verify_and_auth(
    mail_server: ServerFactory,
    dns: DNSServer,
    port: int,
    sinks: list[Sink],
    ca: tuple[trustme.CA, Path],
) -> None:
    authority, ca_file = ca
    sink = smarthost_sink(sinks, port, authority).start()
    server = smarthost_server(mail_server, dns, port, ca_file, "s3cret")
    qid = send(server, ["carol@example.net"], mark="smarthost")  # type: ignore[arg-type]

    [got] = sink.wait_for(1)
    assert got.rcpt_tos == ["carol@example.net"]
    assert got.tls, "STARTTLS was required by the smarthost"
    assert got.login == "relayuser"
    [line] = wait_attempt(server, qid, "carol@example.net", "sent")  # type: ignore[arg-type]
    assert line["relay"] == f"127.0.0.8[127.0.0.8]:{port}"
    wait_removed(server, qid)
    assert not any(
        name.endswith("example.net") for name, _, _ in dns.queries
    ), "a [bracketed] relayhost needs no MX lookup"


def test_smarthost_untrusted_certificate_defers(
    mail_server: ServerFactory,
    dns: DNSServer,
    port: int,
    sinks: list[Sink],
    ca: tuple[trustme.CA, Path],
) -> None:
    """`relayhost_tls = "verify"` and a certificate from an unknown CA: nothing is sent (no
    clear-text fallback, no AUTH), the mail is deferred."""
    authority, _ = ca
    sink = smarthost_sink(sinks, port, authority).start()
    server = smarthost_server(mail_server, dns, port, None, "s3cret")
    qid = send(server, ["carol@example.net"], mark="untrusted")  # type: ignore[arg-type]

    [line] = wait_attempt(server, qid, "carol@example.net", "deferred")  # type: ignore[arg-type]
    assert line["dsn"].startswith("4.")
    assert line["text"] == "Server certificate not verified"  # Postfix's words
    assert sink.received == [] and sink.auth_failures == 0


def test_smarthost_auth_failure_defers_like_postfix(
    mail_server: ServerFactory,
    dns: DNSServer,
    port: int,
    sinks: list[Sink],
    ca: tuple[trustme.CA, Path],
) -> None:
    """A 535 to AUTH is a configuration problem, not the recipient's: Postfix defers it
    (smtp_sasl_auth_soft_bounce = yes, the default) instead of bouncing every message."""
    authority, ca_file = ca
    sink = smarthost_sink(sinks, port, authority).start()
    server = smarthost_server(mail_server, dns, port, ca_file, "wrong")
    qid = send(server, ["carol@example.net"], mark="badauth")  # type: ignore[arg-type]

    server.wait_for_log(rf"{qid}: to=<carol@example\.net>", timeout=10)  # type: ignore[attr-defined]
    assert sink.auth_failures >= 1 and sink.received == []
    [line] = attempt_lines(server, qid)  # type: ignore[arg-type]
    assert (line["status"], line["dsn"][:1]) == ("deferred", "4"), line.group(0)


# ------------------------------------------------------------------------------ crash


def test_sigkill_between_remote_250_and_record_redelivers_once(
    mail_server: ServerFactory, dns: DNSServer, port: int, sinks: list[Sink]
) -> None:
    """At-least-once: the sink SIGKILLs mailhaven right after its 250 for DATA. After a
    restart the message is delivered once more (never lost, never more than twice).
    mailhaven is SIGSTOPped before the 250 goes out, so it cannot record the 250 before the
    SIGKILL lands: the crash falls between the remote 250 and the record, every time."""
    server = mail_server(settings=relay_settings(dns=dns.address, port=port), start=False)
    killed: list[int] = []

    def freeze(item: Received) -> None:
        if not killed:
            os.kill(server.pid, signal.SIGSTOP)

    def crash(item: Received) -> None:
        if not killed:
            killed.append(server.pid)
            os.kill(server.pid, signal.SIGKILL)

    sink = sink_for(sinks, "mx.crash.test", port, on_data=crash)
    sink.before_data_reply = freeze
    sink.start()
    server.start()
    qid = send(server, ["bob@crash.test"], mark="crash")

    sink.wait_for(1)
    assert server.wait_exit(10) == -signal.SIGKILL
    server.kill()  # closes the log files of the dead process
    # the remote 250 never reached the spool: the recipient is still to do
    with sqlite3.connect(f"file:{server.queue_db}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT status FROM recipient WHERE qid = ?", (qid,)).fetchall()
    assert rows and rows[0][0] in ("pending", "deferred"), rows
    assert not [m for m in attempt_lines(server, qid) if m["status"] == "sent"]

    server.start()
    got = sink.wait_for(2, timeout=10)
    assert [t.rcpt_tos for t in got] == [["bob@crash.test"], ["bob@crash.test"]]
    assert got[0].content == got[1].content
    wait_attempt(server, qid, "bob@crash.test", "sent")
    wait_removed(server, qid)
    time.sleep(0.5)  # no further copy arrives once the record says sent
    assert len(sink.received) == 2
