"""Shared TLS session-ticket keys: set/read back through OpenSSL, resumption between separate
contexts (as between processes), rotation, and the fallback when a check fails.

Handshakes run over real loopback sockets: a server thread per connection, the test's client.
"""

from __future__ import annotations

import ctypes
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from mailhaven.net import tls_tickets
from mailhaven.net.tls import ReloadableTLS, build_server_context
from mailhaven.net.tls_tickets import KEY_LENGTH, TicketKeyError, TicketKeys, new_key


@pytest.fixture
def pem(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "c.pem"
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(path))
    return path


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> TicketKeys:
    """A fresh process-wide key holder, the one `build_server_context` uses."""
    fresh = TicketKeys()
    monkeypatch.setattr("mailhaven.net.tls.process_keys", fresh)
    return fresh


def plain_context(pem: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pem)
    return ctx


def client_context(*, tls12: bool = False) -> ssl.SSLContext:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    if tls12:
        client.maximum_version = ssl.TLSVersion.TLSv1_2
    return client


def connect(server: ssl.SSLContext, client: ssl.SSLContext,
            session: ssl.SSLSession | None = None) -> tuple[ssl.SSLSession, bool]:
    """One TLS connection over loopback; (the client's session afterwards, was it resumed)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        failures: list[BaseException] = []

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with server.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"250 ok\r\n")  # carries TLS 1.3's tickets to the client
                    tls.recv(10)
            except (OSError, ssl.SSLError) as err:
                failures.append(err)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        raw = socket.create_connection(listener.getsockname(), timeout=10)
        with client.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
            assert tls.recv(10) == b"250 ok\r\n"
            tls.sendall(b"QUIT\r\n")
            reused, got = tls.session_reused, tls.session
        thread.join(10)
    assert not failures, failures
    assert got is not None
    return got, reused


def test_set_and_read_back(pem: Path) -> None:
    keys, ctx, key = TicketKeys(), plain_context(pem), new_key()
    before = keys.current(ctx)
    assert before is not None and len(before) == KEY_LENGTH  # OpenSSL's own random key
    assert keys.install(key) and keys.apply(ctx)
    assert keys.current(ctx) == key and keys.disabled is None


@pytest.mark.parametrize("tls12", [False, True])
def test_a_session_resumes_on_another_context_with_the_same_key(pem: Path, tls12: bool) -> None:
    """Two contexts given one key are two processes sharing tlsmgr's key: a ticket from one
    is accepted by the other. With another key, or OpenSSL's own, it is not."""
    key, client = new_key(), client_context(tls12=tls12)
    a, b, other, own = (plain_context(pem) for _ in range(4))
    keys = TicketKeys()
    keys.install(key)
    assert keys.apply(a) and keys.apply(b)
    session, reused = connect(a, client)
    assert not reused
    assert connect(b, client, session)[1]
    apart = TicketKeys()
    apart.install(new_key())
    assert apart.apply(other)
    assert not connect(other, client, session)[1]
    assert not connect(own, client, session)[1]


def test_rotation_rekeys_live_contexts(pem: Path) -> None:
    keys, client = TicketKeys(), client_context()
    keys.install(new_key())
    ctx = plain_context(pem)
    keys.apply(ctx)
    old, _ = connect(ctx, client)
    second = new_key()
    assert keys.install(second)
    assert keys.current(ctx) == second
    new, reused = connect(ctx, client, old)
    assert not reused  # one key at a time: tickets from before the rotation are void
    assert connect(ctx, client, new)[1]


def test_the_front_context_keys_decide(keys: TicketKeys, pem: Path) -> None:
    """OpenSSL takes ticket keys from the connection's initial context, not from the backend
    the SNI callback switches to: the listener-facing front is the one that must share."""
    keys.install(new_key())
    issuer = build_server_context(pem, pem)
    client = client_context()
    session, _ = connect(issuer, client)
    tls = ReloadableTLS(pem, pem)
    assert keys.current(tls.context) == keys.key
    foreign = TicketKeys()
    foreign.install(new_key())
    foreign.apply(tls._backend)  # a backend with another key: does not matter
    assert connect(tls.context, client, session)[1]
    foreign.apply(tls.context)  # the front with another key: no resumption
    assert not connect(tls.context, client, session)[1]


def test_two_processes_resume_each_others_sessions_across_reloads(
    keys: TicketKeys, ca: trustme.CA, pem: Path
) -> None:
    """Two `ReloadableTLS` with the process key (as daemon and worker); each reloads a renewed
    certificate, and tickets keep working both ways."""
    keys.install(new_key())
    daemon, worker, client = ReloadableTLS(pem, pem), ReloadableTLS(pem, pem), client_context()
    session, _ = connect(daemon.context, client)
    session, reused = connect(worker.context, client, session)
    assert reused
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
    daemon.reload()
    worker.use(build_server_context(pem, pem), pem, pem)
    session, reused = connect(daemon.context, client, session)
    assert reused
    assert connect(worker.context, client, session)[1]
    assert keys.current(daemon._backend) == keys.current(worker._backend) == keys.key


def failing(monkeypatch: pytest.MonkeyPatch, keys: TicketKeys, how: str) -> None:
    """Make one of the binding's checks fail the way a foreign build would."""
    if how == "no binding":
        def no_binding(self: object) -> None:
            raise TicketKeyError("libssl functions not reachable: statically linked")
        monkeypatch.setattr(tls_tickets._OpenSSL, "__init__", no_binding)
        return
    binding = keys._binding()
    if how == "options differ":
        real: Callable[[int], int] = binding.get_options
        monkeypatch.setattr(binding, "get_options", lambda pointer: real(pointer) ^ 1)
    elif how == "read back differs":
        monkeypatch.setattr(binding, "get_keys", lambda ctx: bytes(KEY_LENGTH))
    elif how == "ctypes error":
        def broken(*args: object) -> int:
            raise ctypes.ArgumentError("wrong type")
        monkeypatch.setattr(binding, "ctrl", broken)


@pytest.mark.parametrize(
    "how", ["no binding", "options differ", "read back differs", "ctypes error"]
)
def test_a_failed_check_warns_once_and_keeps_openssls_own_keys(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, pem: Path, how: str
) -> None:
    keys = TicketKeys()
    failing(monkeypatch, keys, how)
    keys.install(new_key())
    with caplog.at_level(logging.WARNING, "mailhaven.tls"):
        contexts = [plain_context(pem) for _ in range(3)]
        assert not any([keys.apply(ctx) for ctx in contexts])
        assert not keys.install(new_key())
    warnings = [r for r in caplog.records if "cannot share ticket keys" in r.getMessage()]
    assert len(warnings) == 1 and keys.disabled
    client = client_context()
    session, _ = connect(contexts[0], client)  # still serves, with OpenSSL's own key
    assert connect(contexts[0], client, session)[1]


def test_not_an_ssl_context_is_refused_without_touching_memory(pem: Path) -> None:
    keys = TicketKeys()
    keys.install(new_key())
    assert not keys.apply(object())  # type: ignore[arg-type]
    assert keys.disabled and "not an ssl context" in keys.disabled


def test_a_key_of_the_wrong_size_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="80 bytes"):
        TicketKeys().install(b"short")


def test_without_a_key_contexts_keep_their_own(keys: TicketKeys, pem: Path) -> None:
    """`mailhaven check` and tests build contexts with no key installed: nothing is set."""
    ctx = build_server_context(pem, pem)
    own = keys.current(ctx)
    assert own is not None and keys.key is None and keys.disabled is None


async def test_rotation_installs_and_hands_on_a_new_key_each_interval(keys: TicketKeys) -> None:
    import asyncio

    first = new_key()
    keys.install(first)
    sent: list[bytes] = []
    task = asyncio.ensure_future(tls_tickets.rotate(keys, sent.append, interval=0.01))
    try:
        async with asyncio.timeout(5):
            while len(sent) < 2:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert sent[0] != first and sent[0] != sent[1] and keys.key in sent


def test_a_worker_without_the_daemons_key_keeps_its_own(
        keys: TicketKeys, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "mailhaven.tls"):
        keys.adopt(None, "worker 2")
    assert keys.key is None and "worker 2: no TLS ticket key from the daemon" in caplog.text
    key = new_key()
    keys.adopt(key, "worker 2")
    assert keys.key == key
