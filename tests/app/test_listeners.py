"""Binding the listening sockets: an address still held by a stopping instance is waited for
(bounded), one held for good is a clear error."""

from __future__ import annotations

import errno
import socket
import threading
import time

import pytest

from mailhaven.app import listeners


def _holder() -> tuple[socket.socket, str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock, f"127.0.0.1:{sock.getsockname()[1]}"


def test_an_address_let_go_of_while_waiting_is_bound() -> None:
    holder, address = _holder()
    release = threading.Timer(0.3, holder.close)
    release.start()
    started = time.monotonic()
    try:
        socks = listeners.bind_address(address, wait=5.0)
    finally:
        release.cancel()
        holder.close()
    assert 0.2 < time.monotonic() - started < 5.0
    assert [s.getsockname()[1] for s in socks] == [int(address.rsplit(":", 1)[1])]
    for sock in socks:
        sock.close()


def test_an_address_held_for_good_is_a_clear_error_after_the_wait(
    caplog: pytest.LogCaptureFixture,
) -> None:
    holder, address = _holder()
    with holder, pytest.raises(OSError) as raised:
        listeners.bind_address(address, wait=0.3)
    assert raised.value.errno == errno.EADDRINUSE
    assert str(raised.value).endswith(f"cannot listen on {address}: Address already in use")
    assert "waiting up to 0.3 s" in caplog.text
