"""`Type=notify` against a real `mailhaven serve`: the daemon's sd_notify datagrams, received on
a socket the test binds where systemd's would be (NOTIFY_SOCKET)."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.e2e.conftest import ServerFactory

pytestmark = pytest.mark.e2e


class Manager:
    """What systemd does with the datagrams: keep them in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.got: list[str] = []

    def wait_for(self, field: str, timeout: float = 10.0) -> list[str]:
        """Datagrams until one holds `field` (a `KEY=VALUE` line); returns that one's fields."""
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                fields = self.sock.recv(4096).decode().split("\n")
            except TimeoutError:
                raise AssertionError(f"no {field!r} within {timeout}s; got {self.got}") from None
            self.got.extend(fields)
            if field in fields:
                return fields


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    m = Manager(tmp_path / "notify.sock")
    yield m
    m.sock.close()


def test_ready_reloading_watchdog_status_and_stopping(
    mail_server: ServerFactory, manager: Manager
) -> None:
    env = dict(os.environ, NOTIFY_SOCKET=str(manager.path), WATCHDOG_USEC="400000")
    server = mail_server(settings={"local_users": ["postmaster"]}, env=env, start=False)
    server.start()
    ready = manager.wait_for("READY=1")
    # READY=1 only once every listener serves: a client is answered now.
    with smtplib.SMTP(server.host, server.smtp_port, timeout=10) as client:
        assert client.noop()[0] == 250
    assert "STATUS=serving; 0 message(s) in the queue" in ready
    manager.wait_for("WATCHDOG=1")  # every 0.2 s: half of WATCHDOG_USEC
    server.reload()
    reloading = manager.wait_for("RELOADING=1")
    assert any(f.startswith("MONOTONIC_USEC=") and f[15:].isdigit() for f in reloading)
    manager.wait_for("READY=1")
    server.signal(signal.SIGTERM)
    manager.wait_for("STOPPING=1")
    assert server.stop() == 0


def test_only_the_daemon_notifies_never_its_workers(
    mail_server: ServerFactory, manager: Manager
) -> None:
    # Workers must not talk to systemd: the daemon takes the variable before spawning them.
    env = dict(os.environ, NOTIFY_SOCKET=str(manager.path))
    server = mail_server(
        settings={"local_users": ["postmaster"], "smtp_processes": 2}, env=env, start=False
    )
    server.start()
    fields = manager.wait_for("READY=1", timeout=30)
    assert fields[0] == "READY=1"
    server.wait_for_log(r"worker \d+ ready", count=1, timeout=30)
    manager.sock.settimeout(1.0)
    with pytest.raises(TimeoutError):
        manager.sock.recv(4096)  # no second READY from a worker
    assert server.stop() == 0
