"""Helpers shared by the POP3 tests: Maildir files, a fast user database, a running server.

Imported as `tests.pop3d.pop3_fixtures` (pytest runs with `pythonpath = ["."]`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trustme
from argon2 import PasswordHasher

from mailhaven.checks.auth_failures import AuthLimiter
from mailhaven.mailbox.users import UserDB
from mailhaven.pop3d.server import Pop3Listener, start_pop3_server

#: Cheap argon2id parameters: tests check behaviour, not hash strength.
FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
_seq = itertools.count(1)


def deliver(maildir: Path, body: bytes, *, when: int | None = None, name: str | None = None) -> Path:
    """Write a message into new/ as the delivery agent would (LF endings, `,S=` size)."""
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    n = next(_seq)
    base = name or f"{when or 1700000000 + n}.M{n}P4242Q{n}.test.example"
    path = maildir / "new" / f"{base},S={len(body)}"
    path.write_bytes(body)
    return path


def make_users(directory: Path, **accounts: str) -> UserDB:
    db = UserDB(directory / "passwd", hasher=FAST_HASHER)
    for name, password in (accounts or {"alice": "secret"}).items():
        db.add(name, password)
    return db


class Certs:
    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        # A CN as well as SANs: fetchmail checks the subject CN when `sslcommonname` is set.
        self.cert = self.ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
        self.ca_file = directory / "ca.pem"
        self.chain_file = directory / "server.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.cert.private_key_and_cert_chain_pem.write_to_path(str(self.chain_file))

    def server_context(self) -> ssl.SSLContext:
        from mailhaven.net.tls import build_server_context

        return build_server_context(self.chain_file, self.chain_file)

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


@asynccontextmanager
async def running_server(
    mail_root: Path,
    users: UserDB,
    *,
    tls_context: ssl.SSLContext | None = None,
    implicit_tls: bool = False,
    allow_plaintext_on_loopback: bool = True,
    idle_timeout: float = 30.0,
    limiter: AuthLimiter | None = None,
    max_sessions: int = 100,
    login_delay: int = 0,
) -> AsyncIterator[Pop3Listener]:
    listener = await start_pop3_server(
        "127.0.0.1", 0, mail_root=mail_root, users=users, tls_context=tls_context,
        implicit_tls=implicit_tls, allow_plaintext_on_loopback=allow_plaintext_on_loopback,
        hostname="pop.test", idle_timeout=idle_timeout,
        limiter=limiter or AuthLimiter(failure_delay=0.05), max_sessions=max_sessions,
        login_delay=login_delay,
    )
    try:
        yield listener
    finally:
        listener.close()
        await listener.wait_closed(grace=5)


class LineClient:
    """A minimal asyncio POP3 client for scripted sessions (bounded waits everywhere)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, ssl_context: ssl.SSLContext | None = None) -> LineClient:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ssl_context,
            server_hostname="localhost" if ssl_context else None)
        client = cls(reader, writer)
        assert (await client.line()).startswith(b"+OK")
        return client

    async def line(self) -> bytes:
        return await asyncio.wait_for(self.reader.readline(), 10)

    async def cmd(self, text: str) -> bytes:
        self.writer.write(text.encode() + b"\r\n")
        return await self.line()

    async def multi(self, text: str) -> tuple[bytes, list[bytes]]:
        first, lines = await self.cmd(text), []
        if first.startswith(b"+OK"):
            while (line := await self.line()) != b".\r\n":
                assert line, "EOF inside a multi-line response"
                lines.append(line)
        return first, lines

    async def login(self, user: str = "alice", password: str = "secret") -> bytes:
        reply = await self.cmd(f"USER {user}")
        return await self.cmd(f"PASS {password}") if reply == b"+OK\r\n" else reply

    async def eof(self) -> bytes:
        return await asyncio.wait_for(self.reader.read(), 10)

    def abort(self) -> None:
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self.writer.wait_closed()
