"""systemd's notify protocol and socket activation, against sockets the test owns."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailhaven.runtime.systemd import Notifier, listen_sockets


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket standing in for systemd's notify socket (what it binds, we bind)."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def test_notify_sends_state_lines_in_one_datagram(manager: tuple[str, socket.socket]) -> None:
    path, sock = manager
    env = {"NOTIFY_SOCKET": path, "OTHER": "kept"}
    notifier = Notifier.from_environ(env)
    assert notifier is not None and env == {"OTHER": "kept"}  # unset, as sd_notify does
    assert notifier.send("READY=1", "STATUS=queue: 3 active, 1 deferred")
    assert sock.recv(4096) == b"READY=1\nSTATUS=queue: 3 active, 1 deferred"
    assert notifier.send("STATUS=two\nlines")  # a value cannot smuggle another field
    assert sock.recv(4096) == b"STATUS=two lines"
    notifier.close()


def test_abstract_namespace_socket() -> None:
    name = f"mailhaven-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert notifier is not None and notifier.send("STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"
    finally:
        sock.close()


def test_no_socket_no_notifier_and_a_vanished_one_never_raises(tmp_path: Path) -> None:
    assert Notifier.from_environ({}) is None
    assert Notifier.from_environ({"NOTIFY_SOCKET": "relative/path"}) is None
    notifier = Notifier(str(tmp_path / "gone.sock"))
    assert notifier.send("READY=1") is False
    assert notifier.send("READY=1") is False


def test_watchdog_interval_is_half_the_timeout_and_only_for_us() -> None:
    def env() -> dict[str, str]:
        return {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}

    notifier = Notifier.from_environ(env(), pid=42)
    assert notifier is not None and notifier.watchdog_interval == 15.0
    other = Notifier.from_environ(env(), pid=43)
    assert other is not None and other.watchdog_interval is None
    off = Notifier.from_environ({"NOTIFY_SOCKET": "/run/x"})
    assert off is not None and off.watchdog_interval is None


def test_listen_fds_for_another_process_are_ignored() -> None:
    env = {"LISTEN_FDS": "2", "LISTEN_PID": "1"}
    assert listen_sockets(env, pid=2) == []
    assert env == {}


CHILD = """
import json, os, socket
from mailhaven.runtime.systemd import listen_sockets
found = listen_sockets()
conn, _ = found[0][1].accept()
conn.sendall(b"hello from the inherited socket")
conn.close()
print(json.dumps({"names": [n for n, _ in found], "env": "LISTEN_FDS" in os.environ,
                  "ports": [s.getsockname()[1] for _, s in found]}))
"""


def test_socket_activation_serves_the_inherited_socket() -> None:
    # What systemd does: bind, then exec the service with the socket as fd 3 and the
    # variables naming it; LISTEN_PID is the service's own PID (the shell's $$ survives its exec).
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    fd = listener.fileno()
    script = f'LISTEN_PID=$$ exec "$0" -c "$1" 3<&{fd}'
    env = dict(os.environ, LISTEN_FDS="1", LISTEN_FDNAMES="smtp")
    child = subprocess.Popen(
        ["bash", "-c", script, sys.executable, CHILD], env=env, pass_fds=(fd,),
        stdout=subprocess.PIPE, text=True,
    )
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.settimeout(10)
            assert client.recv(100) == b"hello from the inherited socket"
        out, _ = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        listener.close()
    assert child.returncode == 0
    assert out.strip() == f'{{"names": ["smtp"], "env": false, "ports": [{port}]}}'


async def test_report_pings_the_watchdog_and_sends_the_status(
        manager: tuple[str, socket.socket]) -> None:
    path, sock = manager
    sock.setblocking(False)
    notifier = Notifier(path, watchdog_usec=20_000)  # a ping every 0.01 s

    async def status() -> str:
        return "serving; 0 message(s) in the queue"

    task = asyncio.ensure_future(notifier.report(status, status_interval=0.03))
    got: list[bytes] = []
    try:
        async with asyncio.timeout(5):
            while not any(b"STATUS=" in d for d in got):
                await asyncio.sleep(0.005)
                with contextlib.suppress(BlockingIOError):
                    got.append(sock.recv(4096))
    finally:
        task.cancel()
        notifier.close()
    assert got[0] == b"WATCHDOG=1"
    assert b"WATCHDOG=1\nSTATUS=serving; 0 message(s) in the queue" in got
