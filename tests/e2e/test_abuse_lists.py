"""End to end: DNS block/allow lists, access lists and client checks on a real `mailhaven
serve`, with the loopback test DNS server answering the list zones (never real DNS) and real
clients (smtplib, swaks) connecting from different loopback addresses (127.0.0.N), so each
address plays a client with its own standing in the lists.

`trusted_networks` is empty: loopback clients get the MX's checks like any other.
"""

from __future__ import annotations

import os
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.e2e.conftest import ServerFactory
from tests.support.dns_server import DNSServer
from tests.support.server import MailServer

pytestmark = pytest.mark.e2e

MESSAGE = b"From: <sender@example.org>\r\nTo: <postmaster@localhost>\r\nSubject: hi\r\n\r\nhello\r\n"
F2B = Path(__file__).parents[2] / ".tools" / "fail2ban"

RECORDS = {
    # 127.0.0.2: listed by zen (weight 3)
    "2.0.0.127.zen.example": {"A": ["127.0.0.2"]},
    # 127.0.0.4: listed by zen, but on the allow list (-5): welcome
    "4.0.0.127.zen.example": {"A": ["127.0.0.3"]},
    "4.0.0.127.wl.example": {"A": ["127.0.10.2"]},
    # 127.0.0.7: a zone answering outside 127/8 (a wildcarded or hijacked zone)
    "7.0.0.127.zen.example": {"A": ["10.0.0.2"]},
    # 127.0.0.8: "query refused" (Spamhaus through a public resolver) is not a listing
    "8.0.0.127.zen.example": {"A": ["127.255.255.254"]},
    # the sender domain spam.test is on the right-hand-side list
    "spam.test.dbl.example": {"A": ["127.0.1.2"]},
    # 127.0.0.10 has a verified name (for reject_unknown_client)
    "10.0.0.127.in-addr.arpa": {"PTR": ["ten.test"]},
    "ten.test": {"A": ["127.0.0.10"]},
}


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer(RECORDS, servfail={"6.0.0.127.zen.example"},
                   silent={"5.0.0.127.zen.example"}) as server:
        yield server


def settings(dns: DNSServer, **checks: Any) -> dict[str, Any]:
    host, port = dns.address
    base: dict[str, Any] = {
        "trusted_networks": [],
        "relay": {"nameservers": [f"{host}:{port}"]},
        "checks": {
            "dnsbl": {
                "sites": ["zen.example=127.0.0.[2..11]*3", "wl.example=127.0.[0..255].[1..3]*-5"],
                "threshold": 3,
                "sender_domain_sites": ["dbl.example"],
                "wait": 1.0,
            },
        },
    }
    for table, values in checks.items():
        base["checks"][table] = {**base["checks"].get(table, {}), **values}
    return base


@pytest.fixture(scope="module")
def server(module_mail_server: ServerFactory, dns: DNSServer) -> MailServer:
    return module_mail_server(settings={"local_users": ["postmaster", "noreply"]} | settings(
        dns,
        access={"client_block": ["127.0.0.9"], "sender_block": ["blocked.test"],
                "recipient_block": ["noreply@localhost"], "client_allow": ["127.0.0.11"]},
    ))


def client(server: MailServer, source: str, helo: str = "client.test") -> smtplib.SMTP:
    smtp = smtplib.SMTP(timeout=10, source_address=(source, 0), local_hostname=helo)
    smtp.connect(server.host, server.smtp_port)
    return smtp


def rcpt(server: MailServer, source: str, sender: str = "sender@example.org",
         to: str = "postmaster@localhost", helo: str = "client.test") -> tuple[int, str]:
    with client(server, source, helo) as smtp:
        smtp.ehlo()
        assert smtp.mail(sender)[0] == 250
        code, text = smtp.rcpt(to)
        smtp.rset()
    return code, text.decode()


def test_listed_client_is_refused_at_rcpt_with_the_list_named(server: MailServer) -> None:
    code, text = rcpt(server, "127.0.0.2")
    assert (code, text) == (554, "5.7.1 Service unavailable; client [127.0.0.2] blocked using zen.example")
    server.wait_for_log(r"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.2\]: 554 5\.7\.1 Service "
                        r"unavailable; client \[127\.0\.0\.2\] blocked using zen\.example; "
                        r"from=<sender@example\.org> to=<postmaster@localhost>")
    server.wait_for_log(r"dnsbl: client \[127\.0\.0\.2\] listed by zen\.example: score 3, threshold 3")


def test_clean_client_delivers(server: MailServer) -> None:
    with client(server, "127.0.0.3") as smtp:
        assert smtp.sendmail("sender@example.org", ["postmaster@localhost"], MESSAGE) == {}


def test_allow_list_outweighs_the_block_list(server: MailServer) -> None:
    assert rcpt(server, "127.0.0.4")[0] == 250


def test_silent_list_costs_at_most_the_wait_and_refuses_nobody(server: MailServer) -> None:
    started = time.monotonic()
    code, _ = rcpt(server, "127.0.0.5")
    assert code == 250
    assert time.monotonic() - started < 5.0  # wait = 1 s (plus connection and commands)
    server.wait_for_log(r"dnsbl: client \[127\.0\.0\.5\]: not counted: zen\.example: ")


def test_servfail_refuses_nobody(server: MailServer) -> None:
    assert rcpt(server, "127.0.0.6")[0] == 250
    server.wait_for_log(r"dnsbl: client \[127\.0\.0\.6\]: not counted: zen\.example: server failure")


def test_answers_outside_loopback_and_error_codes_are_not_listings(server: MailServer) -> None:
    assert rcpt(server, "127.0.0.7")[0] == 250
    server.wait_for_log(r"warning: dnsbl: client \[127\.0\.0\.7\]: answer outside 127\.0\.0\.0/8 "
                        r"ignored: zen\.example: 10\.0\.0\.2")
    assert rcpt(server, "127.0.0.8")[0] == 250


def test_sender_domain_list(server: MailServer) -> None:
    code, text = rcpt(server, "127.0.0.3", sender="someone@spam.test")
    assert code == 554 and "sender domain spam.test blocked using dbl.example" in text


def test_access_lists(server: MailServer) -> None:
    code, text = rcpt(server, "127.0.0.9")
    assert code == 554 and "Client host rejected: Access denied" in text
    code, text = rcpt(server, "127.0.0.3", sender="x@blocked.test")
    assert code == 554 and "<x@blocked.test>: Sender address rejected: Access denied" in text
    code, text = rcpt(server, "127.0.0.3", to="noreply@localhost")
    assert code == 550 and "Recipient address rejected: Access denied" in text
    # an allowed network is not looked up at all: the expensive checks are skipped
    assert rcpt(server, "127.0.0.11", sender="x@spam.test")[0] == 250


def test_helo_claiming_to_be_us(server: MailServer) -> None:
    """On by default: our host name (the test server's is mx.test) or a local domain."""
    for helo in ("mx.test", "localhost"):
        code, text = rcpt(server, "127.0.0.3", helo=helo)
        assert code == 554 and f"<{helo}>: Helo command rejected: host claims to be us" in text


def test_swaks_sees_the_refusal(server: MailServer, swaks: str) -> None:
    result = subprocess.run(
        [swaks, "--server", f"{server.host}:{server.smtp_port}", "--local-interface", "127.0.0.2",
         "--from", "sender@example.org", "--to", "postmaster@localhost", "--helo", "client.test"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode != 0
    assert "<** 554 5.7.1 Service unavailable; client [127.0.0.2] blocked using zen.example" in result.stdout


def test_fail2ban_filter_matches_the_dnsbl_refusal(server: MailServer) -> None:
    """fail2ban's stock postfix filter (default mode) bans a client refused for a listing."""
    regex = F2B / "usr" / "bin" / "fail2ban-regex"
    if not regex.exists():
        pytest.skip("fail2ban is not unpacked (scripts/install-test-deps)")
    rcpt(server, "127.0.0.2")
    server.wait_for_log(r"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.2\]: 554 ")
    flt = F2B / "etc" / "fail2ban" / "filter.d" / "postfix.conf"
    result = subprocess.run(
        [sys.executable, str(regex), "--out", "msg", str(server.log_path),
         f'{flt}[_daemon="mailhaven/\\w+"]'],
        env={**os.environ, "PYTHONPATH": str(F2B / "usr" / "lib" / "python3" / "dist-packages")},
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert any("blocked using zen.example" in line and "[127.0.0.2]" in line
               for line in result.stdout.splitlines()), result.stdout


def test_client_checks(mail_server: ServerFactory, dns: DNSServer) -> None:
    """reject_unknown_client (which turns the name lookup on) and reject_non_fqdn_helo."""
    server = mail_server(settings=settings(
        dns, dnsbl={"sites": []},
        client={"reject_unknown_client": True, "reject_non_fqdn_helo": True},
    ))
    code, text = rcpt(server, "127.0.0.3")
    assert (code, text) == (450, "4.7.25 Client host rejected: cannot find your hostname, [127.0.0.3]")
    assert rcpt(server, "127.0.0.10")[0] == 250  # ten.test confirms 127.0.0.10
    code, text = rcpt(server, "127.0.0.10", helo="desktop")
    assert code == 504 and "<desktop>: Helo command rejected: need fully-qualified hostname" in text


def test_reload_turns_lists_and_greylisting_on(mail_server: ServerFactory, dns: DNSServer) -> None:
    """SIGHUP applies new `[checks]` to new sessions: a DNS list and greylisting, both off at
    start, refuse and defer after the reload; a bad site keeps the old configuration."""
    server = mail_server(settings=settings(dns, dnsbl={"sites": []}))
    assert rcpt(server, "127.0.0.2")[0] == 250
    server.update_config({"checks": {"dnsbl": {"sites": ["zen.example=127.0.0.[2..9]*3"]},
                                     "greylist": {"enabled": True}}})
    server.reload()
    server.wait_for_log(r"reload: configuration .* applied")
    assert rcpt(server, "127.0.0.2")[0] == 554
    deadline = time.monotonic() + 10
    while (code := rcpt(server, "127.0.0.3")[0]) == 250 and time.monotonic() < deadline:
        time.sleep(0.1)  # the greylist database opens in a thread just after the reload
    assert code == 450
    server.update_config({"checks": {"dnsbl": {"sites": ["zen.example=127.0.0"]}}})
    server.reload()
    server.wait_for_log(r"reload: refused, keeping the old configuration .*checks\.dnsbl\.sites")
    assert rcpt(server, "127.0.0.2")[0] == 554


def test_client_hanging_up_while_its_rcpt_waits(mail_server: ServerFactory, dns: DNSServer) -> None:
    """A RCPT TO waiting on a silent list, then the client leaves: no traceback, no hang, and
    the next client is served."""
    server = mail_server(settings=settings(dns, dnsbl={"wait": 3.0}))
    with socket.create_connection((server.host, server.smtp_port), timeout=10,
                                  source_address=("127.0.0.5", 0)) as raw:
        raw.recv(1024)
        raw.sendall(b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<postmaster@localhost>\r\n")
        time.sleep(0.3)
    assert rcpt(server, "127.0.0.3")[0] == 250
    server.wait_for_log(r"disconnect from unknown\[127\.0\.0\.5\]")
    time.sleep(3.0)  # past the wait: the abandoned decision has been answered into the void
    assert "Traceback" not in server.log() and "internal error" not in server.log()


def test_pipelined_recipients_wait_in_order(server: MailServer) -> None:
    """A pipelining client from an address whose list is silent: every RCPT TO waits (at most
    the wait), and the replies come back in order, then the message is taken."""
    smtp = client(server, "127.0.0.5")
    with smtp:
        smtp.ehlo()
        assert smtp.has_extn("pipelining")
        smtp.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<postmaster@localhost>\r\n"
                  b"RCPT TO:<noreply@localhost>\r\nRCPT TO:<nosuch@localhost>\r\nDATA\r\n")
        codes = [smtp.getreply()[0] for _ in range(5)]
        assert codes == [250, 250, 550, 550, 354]  # noreply is blocked, nosuch unknown
        smtp.send(MESSAGE + b".\r\n")
        assert smtp.getreply()[0] == 250


def test_ipv6_client_is_looked_up_by_nibbles(mail_server: ServerFactory) -> None:
    """RFC 5782 §2.4: an IPv6 client (::1 here) is asked about as 32 reversed nibbles."""
    nibbles = ".".join(reversed("0" * 31 + "1"))
    with DNSServer({f"{nibbles}.zen.example": {"A": ["127.0.0.2"]}}) as six:
        host, port = six.address
        server = mail_server(host="::1", settings={
            "trusted_networks": [], "relay": {"nameservers": [f"{host}:{port}"]},
            "checks": {"dnsbl": {"sites": ["zen.example"], "wait": 2.0}},
        })
        with smtplib.SMTP("::1", server.smtp_port, "client.test", 10) as smtp:
            smtp.ehlo()
            smtp.mail("sender@example.org")
            code, text = smtp.rcpt("postmaster@localhost")
        assert (code, text.decode()) == (554, "5.7.1 Service unavailable; client [::1] blocked using zen.example")
        assert (f"{nibbles}.zen.example", "A", "udp") in six.queries
