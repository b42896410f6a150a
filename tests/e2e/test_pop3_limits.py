"""POP3 under the `[limits]` and `[timeouts]` of a real `mailhaven serve` (issue 16, bug 13).

POP3 used to have no per-address connection limit, no connection rate, and an idle timeout and a
TLS handshake timeout fixed in code. Now `limits.connections_per_ip` and
`limits.connection_rate` apply to POP3 as to SMTP (counted over the POP3 listeners),
`timeouts.pop3_idle` is a setting and `timeouts.tls_handshake` bounds POP3 handshakes too.
Clients talk from chosen loopback source addresses, since every count is per address.
"""

from __future__ import annotations

import socket
import time

import pytest
from tests.e2e.conftest import ServerFactory
from tests.support.server import ConnectionClosed, MailServer, RawClient

pytestmark = pytest.mark.e2e

PER_IP = 2
RATE = 4  # per minute
LIMITS = {"connections_per_ip": PER_IP, "connection_rate": RATE}
IDLE = {"pop3_idle": 1.0}
HANDSHAKE = {"tls_handshake": 1.0}  # a key SMTP had already: it now bounds POP3 too


class Pop3Client(RawClient):
    """A raw POP3 connection from `source`."""

    def __init__(self, server: MailServer, source: str, service: str = "pop3") -> None:
        self.sock = socket.create_connection(
            (server.host, server.port(service)), timeout=10, source_address=(source, 0))
        self.buffer = bytearray()


@pytest.fixture
def limited(mail_server: ServerFactory) -> MailServer:
    """Only keys that existed before: the limits must hold for POP3 too."""
    return mail_server(settings={"local_users": ["postmaster"], "limits": LIMITS},
                       services=("pop3",))


@pytest.fixture
def idle(mail_server: ServerFactory) -> MailServer:
    return mail_server(settings={"local_users": ["postmaster"], "timeouts": IDLE},
                       services=("pop3",))


@pytest.fixture
def handshake(mail_server: ServerFactory) -> MailServer:
    return mail_server(settings={"local_users": ["postmaster"], "timeouts": HANDSHAKE},
                       services=("pop3", "pop3s"))


def greeting(server: MailServer, source: str) -> bytes:
    with Pop3Client(server, source) as client:
        return client.line()


def test_connections_per_address_are_limited_and_released(limited: MailServer) -> None:
    held = [Pop3Client(limited, "127.0.0.1") for _ in range(PER_IP)]
    try:
        for client in held:
            assert client.line().startswith(b"+OK")
        with Pop3Client(limited, "127.0.0.1") as over:
            assert over.read_to_eof() == (
                b"-ERR [SYS/TEMP] Too many connections from your address, try again later\r\n")
        assert greeting(limited, "127.0.0.2").startswith(b"+OK")  # other addresses: served
    finally:
        for client in held:
            client.close()
    # the closed sessions give their counts back (bounded wait for the server to notice)
    deadline = time.monotonic() + 10
    while not (line := greeting(limited, "127.0.0.1")).startswith(b"+OK"):
        assert time.monotonic() < deadline, line
        time.sleep(0.05)
    limited.wait_for_log(r"Too many connections from your address, .*: rip=127\.0\.0\.1$")


def test_connection_rate_per_address(limited: MailServer) -> None:
    for _ in range(RATE):
        assert greeting(limited, "127.0.0.3").startswith(b"+OK")
    assert greeting(limited, "127.0.0.3") == (
        b"-ERR [SYS/TEMP] Too many connections from your address, slow down\r\n")
    assert greeting(limited, "127.0.0.4").startswith(b"+OK")


def test_idle_timeout_is_a_setting(idle: MailServer) -> None:
    with Pop3Client(idle, "127.0.0.5") as client:
        assert client.line().startswith(b"+OK")
        assert client.read_to_eof() == b"-ERR [SYS/TEMP] Disconnected for inactivity\r\n"
    idle.wait_for_log(r"disconnected before login \(idle timeout\)")


@pytest.mark.parametrize("service", ["pop3", "pop3s"])
def test_tls_handshake_timeout_is_a_setting(handshake: MailServer, service: str) -> None:
    """A client that starts TLS (STLS, or port 995) and then says nothing is cut off after
    `tls_handshake`, well before the 10 s this test waits at most."""
    with Pop3Client(handshake, "127.0.0.6", service) as client:
        if service == "pop3":
            assert client.line().startswith(b"+OK")
            client.send(b"STLS\r\n")
            assert client.line() == b"+OK Begin TLS negotiation now\r\n"
        with pytest.raises((ConnectionClosed, ConnectionResetError)):
            client._fill()
