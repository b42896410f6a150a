"""Inbound mail authentication end to end: a real `mailhaven serve`, real clients (swaks,
smtplib) from an untrusted loopback address, and every DNS answer from the tests' own server.

- a forged From: of a `p=reject` domain gets `550 5.7.1` at end of DATA, and nothing is stored;
- a message DKIM-signed by its domain, from an address its SPF record allows, is delivered with
  `spf=pass`, `dkim=pass` and `dmarc=pass` in our `Authentication-Results:` field, and a forged
  field claiming our authserv-id is gone;
- the log line `<qid>: auth: ...` tells the results.
"""

from __future__ import annotations

import smtplib
import subprocess
from collections.abc import Iterator

import dkim
import pytest
from tests.e2e.conftest import ServerFactory
from tests.support.dns_server import DNSServer
from tests.support.server import MailServer

pytestmark = pytest.mark.e2e

HOSTNAME = "mx.test"


@pytest.fixture
def dns(dkim_key: tuple[bytes, str]) -> Iterator[DNSServer]:
    _, record = dkim_key
    zone = {
        "bank.test": {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"]},
        "_dmarc.bank.test": {"TXT": ["v=DMARC1; p=reject; rua=mailto:dmarc@bank.test"]},
        "sel._domainkey.bank.test": {"TXT": [record]},
        "attacker.test": {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"]},
    }
    with DNSServer(zone) as server:
        yield server


@pytest.fixture
def server(mail_server: ServerFactory, dns: DNSServer) -> MailServer:
    return mail_server(settings={
        "hostname": HOSTNAME,
        "local_domains": ["mx.test"],
        "local_users": ["postmaster", "alice"],
        "trusted_networks": [],  # 127.0.0.1 is a stranger here: its mail is checked
        "relay": {"nameservers": [f"{dns.address[0]}:{dns.address[1]}"]},
        "inbound_auth": {"checks": True},
    })  # fmt: skip


def message(sender: str, mark: str) -> bytes:
    return (f"From: The Boss <{sender}>\r\nTo: alice@mx.test\r\nSubject: {mark}\r\n"
            f"Message-ID: <{mark}@bank.test>\r\n\r\nPlease pay invoice {mark}.\r\n").encode()  # fmt: skip


def test_a_forged_from_of_a_reject_domain_gets_550(server: MailServer, swaks: str) -> None:
    done = subprocess.run(
        [swaks, "--server", f"{server.host}:{server.smtp_port}", "--helo", "evil.attacker.test",
         "--from", "crook@attacker.test", "--to", "alice@mx.test",
         "--header", "From: The Boss <boss@bank.test>", "--header", "Subject: forged-1",
         "--body", "Please pay.", "--timeout", "30"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "550 5.7.1" in done.stdout
    assert "DMARC" in done.stdout
    assert server.messages("alice") == []
    server.wait_for_log("milter-reject: END-OF-MESSAGE")
    log = server.log()
    assert "dmarc=fail(p=reject,dis=reject)" in log and "header.from=bank.test" in log


def test_a_signed_message_is_delivered_with_pass_results(
    server: MailServer, dkim_key: tuple[bytes, str]
) -> None:
    pem, _ = dkim_key
    forged = f"Authentication-Results: {HOSTNAME}; dkim=pass header.d=paypal.test\r\n".encode()
    body = message("boss@bank.test", "good-1")
    signed = bytes(dkim.sign(body, b"sel", b"bank.test", pem)) + body
    with smtplib.SMTP(server.host, server.smtp_port, local_hostname="mail.bank.test",
                      timeout=30) as client:  # fmt: skip
        client.sendmail("boss@bank.test", ["alice@mx.test"], forged + signed)
    data = server.wait_for_mark("alice", "good-1")
    head = data.split(b"\n\n")[0].split(b"\r\n\r\n")[0].decode()
    unfolded = head.replace("\r\n\t", " ").replace("\n\t", " ")
    ours = [line for line in unfolded.splitlines() if line.startswith("Authentication-Results:")]
    assert len(ours) == 1, ours
    for part in ("Authentication-Results: mx.test;", "spf=pass", "dkim=pass",
                 "header.d=bank.test", "dmarc=pass", "header.from=bank.test"):  # fmt: skip
        assert part in ours[0]
    assert "paypal.test" not in head
    # the message as signed is intact: what follows our fields still verifies
    assert b"Please pay invoice good-1" in data
    server.wait_for_log(": auth: spf=pass")
    log = server.log()
    assert "dkim=pass(bank.test)" in log and "dmarc=pass" in log


def test_a_trusted_client_is_not_checked(
    mail_server: ServerFactory, dns: DNSServer
) -> None:
    trusting = mail_server(settings={
        "hostname": HOSTNAME, "local_domains": ["mx.test"],
        "local_users": ["postmaster", "alice"], "trusted_networks": ["127.0.0.0/8"],
        "relay": {"nameservers": [f"{dns.address[0]}:{dns.address[1]}"]},
        "inbound_auth": {"checks": True},
    })  # fmt: skip
    with smtplib.SMTP(trusting.host, trusting.smtp_port, timeout=30) as client:
        client.sendmail("crook@attacker.test", ["alice@mx.test"],
                        message("boss@bank.test", "trusted-1"))  # fmt: skip
    data = trusting.wait_for_mark("alice", "trusted-1")
    assert b"Authentication-Results" not in data


def test_a_message_too_large_to_verify_is_accepted_without_forged_fields(
    mail_server: ServerFactory, dns: DNSServer
) -> None:
    """Above `max_verify_size` only the header block is read: DKIM is `policy`, DMARC is not
    enforced, and removing a forged field still copies the whole (spilled) message."""
    server = mail_server(settings={
        "hostname": HOSTNAME, "local_domains": ["mx.test"],
        "local_users": ["postmaster", "alice"], "trusted_networks": [],
        "relay": {"nameservers": [f"{dns.address[0]}:{dns.address[1]}"]},
        "inbound_auth": {"checks": True, "max_verify_size": 4096},
    })  # fmt: skip
    forged = f"Authentication-Results: {HOSTNAME}; dmarc=pass header.from=bank.test\r\n"
    body = "".join(f"line {n:06d} of a long invoice\r\n" for n in range(40000))  # ~1.2 MB
    data = (forged + message("boss@bank.test", "big-1").decode() + body).encode()
    with smtplib.SMTP(server.host, server.smtp_port, timeout=60) as client:
        client.sendmail("crook@attacker.test", ["alice@mx.test"], data)
    stored = server.wait_for_mark("alice", "big-1", timeout=30)
    assert stored.count(b"Authentication-Results:") == 1
    assert b"dkim=policy" in stored and b"dmarc=fail" in stored
    assert stored.rstrip().endswith(b"line 039999 of a long invoice")


def test_a_reload_applies_inbound_auth_to_the_next_message(server: MailServer) -> None:
    """SIGHUP with `dmarc_reject = false`: the next forgery is delivered, quarantined: with
    the quarantine field, into the recipient's Junk folder (DMARC p=quarantine's meaning)."""
    from tests.e2e.test_reload import reload_with

    def send(mark: str) -> None:
        with smtplib.SMTP(server.host, server.smtp_port, local_hostname="evil.attacker.test",
                          timeout=30) as client:  # fmt: skip
            client.sendmail("crook@attacker.test", ["alice@mx.test"],
                            message("boss@bank.test", mark))  # fmt: skip

    with pytest.raises(smtplib.SMTPDataError) as refused:
        send("forged-2")
    assert refused.value.smtp_code == 550
    reload_with(server, {"inbound_auth": {"dmarc_reject": False}})
    send("forged-3")
    data = server.wait_for_mark("alice", "forged-3", folder="Junk")
    assert b"X-Mailhaven-Quarantine: dmarc" in data and b"dmarc=fail" in data
    assert server.messages("alice") == []  # nothing in the INBOX
