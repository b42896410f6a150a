"""End to end: `reverse_lookup` names the client `name[address]` in the log and `Received:`,
from the loopback test DNS server (never real DNS), and never holds up a session for long."""

from __future__ import annotations

import smtplib
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from tests.e2e.conftest import ServerFactory
from tests.support.dns_server import DNSServer, Records
from tests.support.server import MailServer

pytestmark = pytest.mark.e2e

REVERSE = "1.0.0.127.in-addr.arpa"
MESSAGE = b"From: <sender@example.org>\r\nTo: <postmaster@localhost>\r\nSubject: hi\r\n\r\nhello\r\n"


def serve(mail_server: ServerFactory, dns: DNSServer, **settings: Any) -> MailServer:
    host, port = dns.address
    base = {"reverse_lookup": True, "relay": {"nameservers": [f"{host}:{port}"]}}
    return mail_server(settings=base | settings)


def deliver(server: MailServer) -> bytes:
    """One message to postmaster over SMTP; its delivered bytes."""
    with smtplib.SMTP(server.host, server.smtp_port, timeout=10) as client:
        client.sendmail("sender@example.org", ["postmaster@localhost"], MESSAGE)
    return server.wait_for_messages("postmaster", 1)[0].read_bytes()


@pytest.fixture
def dns(request: pytest.FixtureRequest) -> Iterator[DNSServer]:
    """The zone is the test's parameter; `silent` in it names what gets no answer at all."""
    records: Records = dict(getattr(request, "param", {}))
    silent = records.pop("silent", {})
    with DNSServer(records, silent=silent) as server:
        yield server


@pytest.mark.parametrize(
    "dns", [{REVERSE: {"PTR": ["localhost"]}, "localhost": {"A": ["127.0.0.1"]}}], indirect=True
)
def test_confirmed_name_in_log_and_received(mail_server: ServerFactory, dns: DNSServer) -> None:
    server = serve(mail_server, dns)
    delivered = deliver(server)
    server.wait_for_log(r"connect from localhost\[127\.0\.0\.1\]$")
    server.wait_for_log(r"client=localhost\[127\.0\.0\.1\]")
    server.wait_for_log(r"disconnect from localhost\[127\.0\.0\.1\] ")
    assert b"(localhost [127.0.0.1])" in delivered.split(b"\r\n\r\n")[0].replace(b"\r\n\t", b" ")
    assert (REVERSE, "PTR", "udp") in dns.queries
    assert ("localhost", "A", "udp") in dns.queries


@pytest.mark.parametrize(
    "dns", [{REVERSE: {"PTR": ["elsewhere.test"]}, "elsewhere.test": {"A": ["192.0.2.1"]}}],
    indirect=True,
)  # fmt: skip
def test_unconfirmed_name_is_unknown_with_warning(
    mail_server: ServerFactory, dns: DNSServer
) -> None:
    server = serve(mail_server, dns)
    delivered = deliver(server)
    server.wait_for_log(r"warning: hostname elsewhere\.test does not resolve to address 127\.0\.0\.1")
    server.wait_for_log(r"connect from unknown\[127\.0\.0\.1\]$")
    assert b"(unknown [127.0.0.1])" in delivered.split(b"\r\n\r\n")[0].replace(b"\r\n\t", b" ")
    assert b"elsewhere" not in delivered


@pytest.mark.parametrize("dns", [{"silent": {REVERSE: {}}}], indirect=True)
def test_silent_nameserver_costs_at_most_the_timeout(
    mail_server: ServerFactory, dns: DNSServer
) -> None:
    """A nameserver that never answers: `unknown` after `client_lookup`, the mail is taken."""
    server = serve(mail_server, dns, timeouts={"client_lookup": 0.5})
    delivered = deliver(server)
    server.wait_for_log(r"connect from unknown\[127\.0\.0\.1\]$")
    assert b"(unknown [127.0.0.1])" in delivered
    assert (REVERSE, "PTR", "udp") in dns.queries


@pytest.mark.parametrize("dns", [{REVERSE: {"PTR": ["localhost"]}}], indirect=True)
def test_off_asks_nothing(mail_server: ServerFactory, dns: DNSServer) -> None:
    server = serve(mail_server, dns, reverse_lookup=False)
    delivered = deliver(server)
    server.wait_for_log(r"disconnect from unknown\[127\.0\.0\.1\] ")
    assert b"(unknown [127.0.0.1])" in delivered.split(b"\r\n\r\n")[0].replace(b"\r\n\t", b" ")
    assert dns.queries == []


@pytest.mark.parametrize(
    "dns",
    [{"silent": {REVERSE: {}}, "2.0.0.127.in-addr.arpa": {"PTR": ["two.test"]},
      "two.test": {"A": ["127.0.0.2"]}}],
    indirect=True,
)  # fmt: skip
def test_a_slow_lookup_holds_up_only_its_own_session(
    mail_server: ServerFactory, dns: DNSServer
) -> None:
    """While 127.0.0.1's lookup waits on a silent nameserver, 127.0.0.2 is named and served."""
    server = serve(mail_server, dns, timeouts={"client_lookup": 30.0})
    with socket.create_connection((server.host, server.smtp_port), timeout=10) as waiting:
        other = smtplib.SMTP(timeout=10, source_address=("127.0.0.2", 0))
        other.connect(server.host, server.smtp_port)
        with other:
            other.sendmail("sender@example.org", ["postmaster@localhost"], MESSAGE)
        server.wait_for_log(r"disconnect from two\.test\[127\.0\.0\.2\] ")
        # the first client is still waiting for its greeting, and not yet logged as connected
        waiting.setblocking(False)
        with pytest.raises(BlockingIOError):
            waiting.recv(1)
        assert "[127.0.0.1]" not in server.log()
    # gone while being named: logged as connected and disconnected, like any session
    server.wait_for_log(r"connect from unknown\[127\.0\.0\.1\]$")
    server.wait_for_log(r"disconnect from unknown\[127\.0\.0\.1\] commands=0")
    assert b"(two.test [127.0.0.2])" in server.wait_for_messages("postmaster", 1)[0].read_bytes()


@pytest.mark.parametrize(
    "dns", [{REVERSE: {"PTR": ["localhost"]}, "localhost": {"A": ["127.0.0.1"]}}], indirect=True
)
def test_reload_turns_it_on(mail_server: ServerFactory, dns: DNSServer) -> None:
    server = serve(mail_server, dns, reverse_lookup=False)
    deliver(server)
    assert dns.queries == []
    server.update_config({"reverse_lookup": True})
    server.reload()
    server.wait_for_log(r"reload: configuration .* applied")
    with smtplib.SMTP(server.host, server.smtp_port, timeout=10) as client:
        client.noop()
    server.wait_for_log(r"disconnect from localhost\[127\.0\.0\.1\] ")
