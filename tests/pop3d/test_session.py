"""The POP3 server over loopback sockets: TLS, locking, maildrop semantics, limits and logs."""

from __future__ import annotations

import asyncio
import logging
import os
import random
from pathlib import Path

import pytest
from tests.pop3d.pop3_fixtures import Certs, LineClient, deliver, make_users, running_server

from mailhaven.checks.auth_failures import AuthLimiter
from mailhaven.mailbox.users import UserDB
from mailhaven.pop3d import maildrop as md


@pytest.fixture
def users(tmp_path: Path) -> UserDB:
    return make_users(tmp_path, alice="secret", bob="hunter2")


@pytest.fixture
def mail_root(tmp_path: Path) -> Path:
    root = tmp_path / "mail"
    deliver(root / "alice", b"Subject: one\n\nfirst\n")
    deliver(root / "alice", b"Subject: two\n\n.second\n")
    return root


def files(maildir: Path) -> list[str]:
    return sorted(os.listdir(maildir / "new")) + sorted(os.listdir(maildir / "cur"))


async def test_stls_discards_plaintext_pipelined_before_the_handshake(
    tmp_path: Path, users: UserDB, mail_root: Path
) -> None:
    certs = Certs(tmp_path)
    async with running_server(mail_root, users, tls_context=certs.server_context(),
                              allow_plaintext_on_loopback=False) as server:
        client = await LineClient.connect(server.port)
        assert (await client.login()).startswith(b"-ERR [AUTH] Plaintext authentication")
        # The classic injection: commands glued to STLS must not run after the upgrade.
        client.writer.write(b"STLS\r\nUSER alice\r\nPASS secret\r\n")
        assert await client.line() == b"+OK Begin TLS negotiation now\r\n"
        await client.writer.start_tls(certs.client_context(), server_hostname="localhost")
        assert await client.cmd("STAT") == b"-ERR Command not valid in this state\r\n"
        _first, capa = await client.multi("CAPA")
        assert b"USER\r\n" in capa and b"STLS\r\n" not in capa
        assert (await client.login()).startswith(b"+OK Logged in, 2 messages")
        assert await client.cmd("QUIT") == b"+OK Logging out\r\n"
        await client.close()


async def test_second_session_is_refused_in_use(users: UserDB, mail_root: Path) -> None:
    async with running_server(mail_root, users) as server:
        first = await LineClient.connect(server.port)
        assert (await first.login()).startswith(b"+OK")
        second = await LineClient.connect(server.port)
        assert await second.login() == b"-ERR [IN-USE] Mailbox is locked by another session\r\n"
        other_user = await LineClient.connect(server.port)
        assert (await other_user.login("bob", "hunter2")).startswith(b"+OK Logged in, 0 mess")
        assert await first.cmd("QUIT") == b"+OK Logging out\r\n"
        assert (await second.login()).startswith(b"+OK")  # released at the end of the session
        for c in (first, second, other_user):
            await c.close()


async def test_a_refused_login_does_not_start_the_login_delay(
    users: UserDB, mail_root: Path
) -> None:
    """LOGIN-DELAY counts logins that got in: one refused [IN-USE] (the maildrop locked by
    someone else) must not lock the user out for the delay once the lock is free."""
    async with running_server(mail_root, users, login_delay=900) as server:
        held = md.MaildropLock.acquire(mail_root / "alice")
        assert held is not None
        client = await LineClient.connect(server.port)
        assert (await client.login()).startswith(b"-ERR [IN-USE]")
        held.release()
        assert (await client.login()).startswith(b"+OK Logged in, 2 messages")
        assert await client.cmd("QUIT") == b"+OK Logging out\r\n"
        again = await LineClient.connect(server.port)
        assert (await again.login()).startswith(b"-ERR [LOGIN-DELAY]")
        for c in (client, again):
            await c.close()


async def test_dropped_connection_deletes_nothing(users: UserDB, mail_root: Path) -> None:
    before = files(mail_root / "alice")
    async with running_server(mail_root, users) as server:
        client = await LineClient.connect(server.port)
        await client.login()
        assert await client.cmd("DELE 1") == b"+OK Message 1 deleted\r\n"
        assert await client.cmd("DELE 2") == b"+OK Message 2 deleted\r\n"
        assert (await client.multi("RETR 1"))[0] == b"-ERR Message is deleted\r\n"
        client.abort()
        again = await LineClient.connect(server.port)
        for _ in range(50):  # the lock goes when the server notices the reset
            reply = await again.login()
            if not reply.startswith(b"-ERR [IN-USE]"):
                break
            await asyncio.sleep(0.05)
        assert await again.cmd("STAT") == b"+OK 2 48\r\n"
        await again.close()
    assert files(mail_root / "alice") == before


async def test_delivery_during_a_session_is_kept(users: UserDB, mail_root: Path) -> None:
    maildir = mail_root / "alice"
    async with running_server(mail_root, users) as server:
        client = await LineClient.connect(server.port)
        await client.login()
        late = deliver(maildir, b"Subject: late\n\nhello\n")
        assert await client.cmd("STAT") == b"+OK 2 48\r\n"  # the snapshot does not move
        _, body = await client.multi("RETR 1")
        assert body == [b"Subject: one\r\n", b"\r\n", b"first\r\n"]
        assert await client.cmd("DELE 2") == b"+OK Message 2 deleted\r\n"
        assert await client.cmd("RSET") == b"+OK Maildrop has 2 messages (48 octets)\r\n"
        assert await client.cmd("DELE 2") == b"+OK Message 2 deleted\r\n"
        assert await client.cmd("QUIT") == b"+OK Logging out\r\n"
        assert await client.eof() == b""
        next_session = await LineClient.connect(server.port)
        assert (await next_session.login()).startswith(b"+OK Logged in, 2 messages")
        _, uidl = await next_session.multi("UIDL")
        assert uidl[1] == f"2 {late.name}\r\n".encode()
        await next_session.cmd("QUIT")
    assert late.exists()
    assert [n.endswith(":2,S") for n in os.listdir(maildir / "cur")] == [True]


async def test_failed_logins_are_delayed_limited_and_logged(
    users: UserDB, mail_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mailhaven.pop3d")
    limiter = AuthLimiter(max_failures=2, max_address_failures=2, window=60.0, failure_delay=0.2)
    async with running_server(mail_root, users, limiter=limiter) as server:
        client = await LineClient.connect(server.port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await client.login("alice", "wrong") == b"-ERR [AUTH] Authentication failed\r\n"
        assert loop.time() - started >= 0.2
        assert await client.login("nobody", "x") == b"-ERR [AUTH] Authentication failed\r\n"
        # Now the IP is blocked: even the right password is refused, the same way.
        assert await client.login("alice", "secret") == b"-ERR [AUTH] Authentication failed\r\n"
        assert await client.eof() == b""  # three failures on one connection: hang up
    messages = [r.getMessage() for r in caplog.records]
    assert sum("login failed (auth failed): user=<alice>, method=USER" in m for m in messages) == 1
    assert any("login failed (blocked)" in m for m in messages)
    assert any("disconnected before login (auth failed, 3 attempts)" in m for m in messages)


async def test_idle_timeout(users: UserDB, mail_root: Path) -> None:
    async with running_server(mail_root, users, idle_timeout=0.3) as server:
        client = await LineClient.connect(server.port)
        await client.login()
        assert await client.line() == b"-ERR [SYS/TEMP] Disconnected for inactivity\r\n"
        assert await client.eof() == b""
    assert len(files(mail_root / "alice")) == 2


async def test_graceful_shutdown_ends_sessions_without_update(
    users: UserDB, mail_root: Path
) -> None:
    async with running_server(mail_root, users) as server:
        client = await LineClient.connect(server.port)
        await client.login()
        await client.cmd("DELE 1")
        server.close()
        assert await client.line() == b"-ERR [SYS/TEMP] Server shutting down\r\n"
        await server.wait_closed(grace=5)
        assert not server.sessions
    assert len(files(mail_root / "alice")) == 2


async def test_garbage_gets_err_never_a_traceback(
    users: UserDB, mail_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(1939)
    async with running_server(mail_root, users) as server:
        for _ in range(5):
            client = await LineClient.connect(server.port)
            noise = bytes(rng.randrange(256) for _ in range(3000)).replace(b"\n", b"\r\n")
            client.writer.write(noise + b"\r\n")
            replies = (await client.eof()).split(b"\r\n")
            assert replies[-1] == b""
            assert all(r.startswith((b"+OK", b"-ERR", b"+ ")) or r in (b"", b".") or
                       r in (b"PLAIN", b"LOGIN") for r in replies), replies
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_internal_error_answers_sys_temp_and_spares_other_sessions(
    users: UserDB, mail_root: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken_scan(path: Path, cache: md.SizeCache) -> list[md.Message]:
        raise RuntimeError("disk on fire")

    async with running_server(mail_root, users) as server:
        monkeypatch.setattr(md, "scan", broken_scan)
        client = await LineClient.connect(server.port)
        assert await client.login() == b"-ERR [SYS/TEMP] Internal error, try again later\r\n"
        monkeypatch.undo()
        again = await LineClient.connect(server.port)
        assert (await again.login()).startswith(b"+OK")  # and the lock was released
        await again.cmd("QUIT")
    assert any("internal error" in r.getMessage() for r in caplog.records)


async def test_login_and_logout_log_lines(
    users: UserDB, mail_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mailhaven.pop3d")
    async with running_server(mail_root, users) as server:
        client = await LineClient.connect(server.port)
        await client.login()
        await client.multi("RETR 1")
        await client.multi("RETR 2")
        await client.multi("TOP 1 0")
        await client.cmd("DELE 1")
        await client.cmd("QUIT")
        await client.eof()
    messages = [r.getMessage() for r in caplog.records]
    login = next(m for m in messages if m.startswith("login:"))
    assert "user=<alice>, method=USER, rip=127.0.0.1, lip=127.0.0.1, session=" in login
    logout = next(m for m in messages if m.startswith("logout:"))
    assert "user=<alice>, reason=QUIT, top=1/23, retr=2/48, del=1/2, size=48" in logout


async def test_too_many_sessions(users: UserDB, mail_root: Path) -> None:
    async with running_server(mail_root, users, max_sessions=1) as server:
        first = await LineClient.connect(server.port)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"-ERR [SYS/TEMP] Too many")
        writer.close()
        await first.close()


async def test_implicit_tls_and_sasl_plain(tmp_path: Path, users: UserDB, mail_root: Path) -> None:
    certs = Certs(tmp_path)
    async with running_server(mail_root, users, tls_context=certs.server_context(),
                              implicit_tls=True, allow_plaintext_on_loopback=False) as server:
        client = await LineClient.connect(server.port, certs.client_context())
        _, capa = await client.multi("CAPA")
        assert b"SASL PLAIN LOGIN\r\n" in capa and b"STLS\r\n" not in capa
        assert await client.cmd("AUTH PLAIN") == b"+ \r\n"
        assert await client.cmd("AGFsaWNlAHNlY3JldA==") == b"+OK Logged in, 2 messages (48 octets)\r\n"
        await client.cmd("QUIT")


@pytest.mark.both_loops
@pytest.mark.parametrize("ending", ["close", "reset"])
async def test_stls_after_a_failed_login_from_a_closed_client_ends_the_session(
    tmp_path: Path, users: UserDB, mail_root: Path, ending: str
) -> None:
    # USER, a wrong PASS and STLS pipelined, then gone: the STLS runs after the failed-login
    # delay, against a connection that no longer exists. Every such session must end (and
    # free its slot), or a few hundred of them fill the listener.
    certs = Certs(tmp_path)
    limiter = AuthLimiter(max_failures=1000, failure_delay=0.05)  # this is not about guessing
    async with running_server(mail_root, users, tls_context=certs.server_context(),
                              max_sessions=5, limiter=limiter) as server:
        for _ in range(3):
            clients = [await LineClient.connect(server.port) for _ in range(5)]
            for client in clients:
                client.writer.write(b"USER alice\r\nPASS wrong\r\nSTLS\r\n")
                await client.writer.drain()
                client.abort() if ending == "reset" else await client.close()
            for _ in range(200):
                if not server.sessions:
                    break
                await asyncio.sleep(0.05)
            assert not server.sessions
            assert not server.clients.per_ip  # each address's count given back, once
        client = await LineClient.connect(server.port)
        assert (await client.login()).startswith(b"+OK Logged in")
        assert await client.cmd("QUIT") == b"+OK Logging out\r\n"
        await client.close()
