"""The asyncio SMTP client against aiosmtpd (in this event loop) and scripted fake servers.

Loopback only, ephemeral ports, no DNS: every server here is stopped by its context manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from mailhaven.delivery import smtp_connection
from mailhaven.delivery.smtp_connection import (
    BODY_CHUNK,
    SessionFailure,
    SMTPClientConnection,
    client_tls_context,
)
from mailhaven.proto.envelope import RecipientSpec
from mailhaven.proto.replies import Reply
from mailhaven.proto.smtp_client import Credentials, MailTransaction, Phase, Timeouts

HELO = "client.test"
SHORT = Timeouts(
    connect=5, greeting=5, helo=5, starttls=5, mail=5, rcpt=5, data_init=5, data_block=5,
    data_end=10, rset=5, quit=5,
)  # fmt: skip


class Recorder:
    """An aiosmtpd handler that keeps what it receives and rejects chosen recipients."""

    def __init__(self, reject: dict[str, str] | None = None) -> None:
        self.reject = reject or {}
        self.messages: list[tuple[str, list[str], bytes, list[str], Any]] = []
        self.rcpt_options: list[list[str]] = []

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address in self.reject:
            return self.reject[address]
        envelope.rcpt_tos.append(address)
        self.rcpt_options.append(options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        assert envelope.mail_from is not None
        self.messages.append(
            (envelope.mail_from, list(envelope.rcpt_tos), content, envelope.mail_options,
             session.peer)
        )  # fmt: skip
        return f"250 2.0.0 Ok: queued as Q{len(self.messages)}"


@contextlib.asynccontextmanager
async def serve(factory: Callable[[], asyncio.Protocol]) -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await server.wait_closed()


def aiosmtpd(handler: Recorder, **kwargs: Any) -> contextlib.AbstractAsyncContextManager[int]:
    loop = asyncio.get_running_loop()
    kwargs.setdefault("hostname", "mx.test")  # never getfqdn(): no DNS
    return serve(lambda: SMTP(handler, loop=loop, **kwargs))


@contextlib.asynccontextmanager
async def scripted(
    script: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    tasks: set[asyncio.Task[None]] = set()

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        finally:
            writer.close()

    def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.ensure_future(run(reader, writer)))

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def txn(*rcpts: str, **kwargs: Any) -> MailTransaction:
    return MailTransaction("sender@client.test", tuple(RecipientSpec(r) for r in rcpts), **kwargs)


async def connect(port: int, **kwargs: Any) -> SMTPClientConnection:
    kwargs.setdefault("tls_policy", "none")
    conn = await SMTPClientConnection.connect(
        "mx.test", port, address="127.0.0.1", helo_name=HELO, timeouts=SHORT, **kwargs
    )
    assert isinstance(conn, SMTPClientConnection), conn
    return conn


@pytest.fixture(scope="module")
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.test", "127.0.0.1").configure_cert(ctx)
    return ctx


@pytest.fixture(scope="module")
def client_trusting(ca: trustme.CA) -> ssl.SSLContext:
    ctx = client_tls_context(verify=True)
    ca.configure_trust(ctx)
    return ctx


async def test_send_with_mixed_results_and_reuse() -> None:
    handler = Recorder({"later@mx.test": "450 4.2.0 greylisted", "nobody@mx.test": "550 5.1.1 no"})
    async with aiosmtpd(handler) as port:
        conn = await connect(port)
        assert conn.relay == f"mx.test[127.0.0.1]:{port}"
        assert conn.capabilities.has("8BITMIME") and conn.capabilities.size == 33554432
        results = await conn.send(
            txn("a@mx.test", "later@mx.test", "nobody@mx.test", size=30),
            b"Subject: one\n\n.leading dot\n.\nend\n",
        )
        assert {a: r.code for a, r in results.items()} == {
            "a@mx.test": 250, "later@mx.test": 450, "nobody@mx.test": 550,
        }  # fmt: skip
        assert results["a@mx.test"].text == "Ok: queued as Q1"
        assert results["a@mx.test"].enhanced == "2.0.0"
        # The same session: a transaction where nobody is accepted (RSET), then another message.
        assert await conn.send(txn("nobody@mx.test"), b"x") == {
            "nobody@mx.test": results["nobody@mx.test"]
        }
        assert conn.usable
        again = await conn.send(txn("b@mx.test", body_8bit=True), io.BytesIO(b"\xe9t\xe9\n"))
        assert again["b@mx.test"].code == 250
        await conn.quit()
        assert not conn.usable
    [first, second] = handler.messages
    assert first[:3] == (
        "sender@client.test",
        ["a@mx.test"],
        b"Subject: one\r\n\r\n.leading dot\r\n.\r\nend\r\n",
    )
    assert first[3] == ["SIZE=30"]
    assert second[2] == b"\xe9t\xe9\r\n" and second[3] == ["BODY=8BITMIME"]
    assert first[4] == second[4]  # one TCP connection for both


async def test_size_refused_before_sending() -> None:
    handler = Recorder()
    async with aiosmtpd(handler, data_size_limit=1000) as port:
        conn = await connect(port)
        results = await conn.send(txn("a@mx.test", size=5000), b"x" * 5000)
        assert (results["a@mx.test"].code, results["a@mx.test"].enhanced) == (552, "5.3.4")
        await conn.quit()
    assert handler.messages == []


async def test_smtputf8(tmp_path: Path) -> None:
    handler = Recorder()
    async with aiosmtpd(handler, enable_SMTPUTF8=True) as port:
        conn = await connect(port)
        results = await conn.send(txn("rené@mx.test"), "Subject: é\n\nx\n".encode())
        assert results["rené@mx.test"].code == 250
        await conn.quit()
    async with aiosmtpd(Recorder()) as port:
        conn = await connect(port)
        results = await conn.send(txn("rené@mx.test"), b"x")
        assert results["rené@mx.test"].enhanced == "5.6.7"
        await conn.quit()
    assert "SMTPUTF8" in handler.messages[0][3]


async def test_ten_mib_message_is_streamed(tmp_path: Path) -> None:
    line = b"0123456789" * 7 + b"\n"
    body = b"Subject: big\n\n" + (line + b".dot\n") * (10 * 1024 * 1024 // (len(line) + 5))
    path = tmp_path / "big.msg"
    path.write_bytes(body)
    sizes: list[int] = []

    class Spy(io.BufferedReader):
        def read(self, size: int | None = -1, /) -> bytes:
            sizes.append(-1 if size is None else size)
            return super().read(size)

    handler = Recorder()
    async with aiosmtpd(handler) as port:
        conn = await connect(port)
        with Spy(io.FileIO(path)) as spool_file:
            results = await conn.send(txn("a@mx.test", size=len(body)), spool_file)
        assert results["a@mx.test"].code == 250
        await conn.quit()
    assert len(body) >= 10 * 1024 * 1024 - 100
    assert len(sizes) > 100 and max(sizes) == BODY_CHUNK
    assert handler.messages[0][2] == body.replace(b"\n", b"\r\n")


async def test_starttls_verified(
    server_tls: ssl.SSLContext, client_trusting: ssl.SSLContext
) -> None:
    handler = Recorder()
    async with aiosmtpd(handler, tls_context=server_tls, require_starttls=True) as port:
        conn = await connect(port, tls_policy="verify", ssl_context=client_trusting)
        assert conn.tls_active and conn.tls_info is not None and "TLSv1" in conn.tls_info
        assert not conn.capabilities.has("STARTTLS")  # the post-TLS EHLO
        assert (await conn.send(txn("a@mx.test"), b"hi\n"))["a@mx.test"].code == 250
        await conn.quit()
    assert len(handler.messages) == 1


async def test_verify_fails_on_an_untrusted_certificate(server_tls: ssl.SSLContext) -> None:
    async with aiosmtpd(Recorder(), tls_context=server_tls) as port:
        failure = await SMTPClientConnection.connect(
            "mx.test", port, address="127.0.0.1", helo_name=HELO, tls_policy="verify",
            timeouts=SHORT,
        )  # fmt: skip
        assert isinstance(failure, SessionFailure)
        assert failure.phase is Phase.TLS_HANDSHAKE and failure.reply.enhanced == "4.7.5"
        assert failure.reply.text == "Server certificate not verified"  # Postfix's words
        # "may" does not check the certificate (RFC 7435), so the same server is fine.
        conn = await connect(port, tls_policy="may")
        assert conn.tls_active
        await conn.quit()


async def test_may_falls_back_to_clear_text_after_a_failed_handshake() -> None:
    old_server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    old_server.maximum_version = ssl.TLSVersion.TLSv1_2  # the client below wants 1.3
    trustme.CA().issue_cert("mx.test").configure_cert(old_server)
    client_ctx = client_tls_context(verify=False)
    client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    handler = Recorder()
    async with aiosmtpd(handler, tls_context=old_server) as port:
        conn = await connect(port, tls_policy="may", ssl_context=client_ctx)
        assert not conn.tls_active
        assert (await conn.send(txn("a@mx.test"), b"x"))["a@mx.test"].code == 250
        await conn.quit()
        failure = await SMTPClientConnection.connect(
            "mx.test", port, address="127.0.0.1", helo_name=HELO, tls_policy="encrypt",
            ssl_context=client_ctx, timeouts=SHORT,
        )  # fmt: skip
        assert isinstance(failure, SessionFailure) and failure.reply.enhanced == "4.7.5"
        assert failure.reply.text == "Cannot start TLS: handshake failure"  # Postfix's words
    assert len(handler.messages) == 1


async def test_encrypt_requires_starttls() -> None:
    async with aiosmtpd(Recorder()) as port:
        failure = await SMTPClientConnection.connect(
            "mx.test", port, address="127.0.0.1", helo_name=HELO, tls_policy="encrypt",
            timeouts=SHORT,
        )  # fmt: skip
        assert isinstance(failure, SessionFailure) and failure.reply.enhanced == "4.7.4"


def _authenticator(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"u", b"p\xc3\xa9")
    return AuthResult(success=ok, handled=False)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_auth_over_starttls(
    server_tls: ssl.SSLContext, client_trusting: ssl.SSLContext, mechanism: str
) -> None:
    handler = Recorder()
    excluded = ["LOGIN"] if mechanism == "PLAIN" else ["PLAIN"]
    kwargs = dict(
        tls_context=server_tls, authenticator=_authenticator, auth_required=True,
        auth_exclude_mechanism=excluded,
    )  # fmt: skip
    async with aiosmtpd(handler, **kwargs) as port:
        conn = await connect(
            port, tls_policy="verify", ssl_context=client_trusting,
            credentials=Credentials("u", "pé"),
        )  # fmt: skip
        assert conn.capabilities.auth == {mechanism}
        assert (await conn.send(txn("a@mx.test"), b"x"))["a@mx.test"].code == 250
        await conn.quit()
        failure = await SMTPClientConnection.connect(
            "mx.test", port, address="127.0.0.1", helo_name=HELO, tls_policy="verify",
            ssl_context=client_trusting, credentials=Credentials("u", "wrong"), timeouts=SHORT,
        )  # fmt: skip
        assert isinstance(failure, SessionFailure)
        assert failure.phase is Phase.AUTH and failure.reply.code == 454  # soft bounce
        assert failure.reply.enhanced == "4.7.8" and "said: 535" in failure.reply.text
    assert len(handler.messages) == 1


async def test_no_credentials_in_clear_text() -> None:
    async with aiosmtpd(Recorder(), authenticator=_authenticator, auth_require_tls=False) as port:
        failure = await SMTPClientConnection.connect(
            "mx.test", port, address="127.0.0.1", helo_name=HELO, tls_policy="none",
            credentials=Credentials("u", "pé"), timeouts=SHORT,
        )  # fmt: skip
        assert isinstance(failure, SessionFailure) and failure.reply.enhanced == "4.7.0"
        conn = await connect(port, credentials=Credentials("u", "pé"), allow_plaintext_auth=True)
        await conn.quit()


async def test_injected_plaintext_after_starttls_is_ignored(server_tls: ssl.SSLContext) -> None:
    seen: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 fake ESMTP\r\n")
        seen.append(await reader.readline())
        writer.write(b"250-fake\r\n250 STARTTLS\r\n")
        seen.append(await reader.readline())
        writer.write(b"220 go ahead\r\n250-injected\r\n250 AUTH PLAIN\r\n")
        await writer.drain()
        await writer.start_tls(server_tls)
        seen.append(await reader.readline())
        writer.write(b"250-fake\r\n250 SIZE 12345\r\n")
        seen.append(await reader.readline())
        writer.write(b"221 bye\r\n")

    async with scripted(script) as port:
        conn = await connect(port, tls_policy="may")
        assert conn.tls_active and conn.capabilities.size == 12345
        assert conn.capabilities.auth == frozenset()
        await conn.quit()
    assert seen == [b"EHLO client.test\r\n", b"STARTTLS\r\n", b"EHLO client.test\r\n", b"QUIT\r\n"]


async def test_pipelined_group_is_one_write() -> None:
    got: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 fake\r\n")
        await reader.readline()
        writer.write(b"250-fake\r\n250 PIPELINING\r\n")
        await asyncio.sleep(0.05)  # let the whole group arrive
        got.append(await reader.read(4096))
        writer.write(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n354 go\r\n")
        got.append(await reader.readuntil(b"\r\n.\r\n"))
        writer.write(b"250 2.0.0 done\r\n")
        await reader.readline()
        writer.write(b"221 bye\r\n")

    async with scripted(script) as port:
        conn = await connect(port)
        results = await conn.send(txn("a@x", "b@x"), b"body")
        assert {a: r.code for a, r in results.items()} == {"a@x": 250, "b@x": 550}
        await conn.quit()
    assert got == [
        b"MAIL FROM:<sender@client.test>\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n",
        b"body\r\n.\r\n",
    ]


async def test_greeting_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with scripted(silent) as port:
        failure = await SMTPClientConnection.connect(
            "[127.0.0.1]", port, helo_name=HELO, timeouts=Timeouts(greeting=0.2)
        )
    assert isinstance(failure, SessionFailure) and failure.phase is Phase.GREETING
    assert failure.reply.text == (
        "conversation with 127.0.0.1[127.0.0.1] timed out while receiving the initial server"
        " greeting"
    )
    assert failure.reply.is_temporary
    assert failure.relay == f"127.0.0.1[127.0.0.1]:{port}"


async def test_connection_lost_during_data_defers() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 fake\r\n")
        await reader.readline()
        writer.write(b"250 fake\r\n")
        await reader.readline()
        writer.write(b"250 ok\r\n")
        await reader.readline()
        writer.write(b"250 ok\r\n")
        await reader.readline()
        writer.write(b"354 go\r\n")
        await reader.readuntil(b"\r\n.\r\n")  # then hang up without a word

    async with scripted(script) as port:
        conn = await connect(port)
        results = await conn.send(txn("a@x"), b"body")
        assert results["a@x"].code == 421 and results["a@x"].enhanced == "4.4.2"
        assert results["a@x"].text == (  # Postfix smtp(8)'s words (issue 16 #5)
            "lost connection with mx.test[127.0.0.1] while sending end of data -- message may"
            " be sent more than once"
        )
        assert not conn.usable
        assert (await conn.send(txn("b@x"), b"x"))["b@x"].is_temporary
        await conn.quit()


async def test_connect_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    failure = await SMTPClientConnection.connect(
        "mx.test", port, address="127.0.0.1", helo_name=HELO
    )
    assert isinstance(failure, SessionFailure) and failure.phase is None
    # Postfix's words (issue 16 #5), no Python exception text; no relay: nothing answered
    assert failure.reply == Reply(
        421, f"connect to mx.test[127.0.0.1]:{port}: Connection refused", "4.4.1"
    )
    assert failure.relay == "none" and failure.reply.answered is None


async def test_source_address() -> None:
    handler = Recorder()
    async with aiosmtpd(handler) as port:
        conn = await connect(port, source_address=("127.0.0.2", 0))
        await conn.send(txn("a@mx.test"), b"x")
        await conn.quit()
    assert handler.messages[0][4][0] == "127.0.0.2"


async def test_implicit_tls(server_tls: ssl.SSLContext, client_trusting: ssl.SSLContext) -> None:
    loop = asyncio.get_running_loop()
    handler = Recorder()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="mx.test", loop=loop), "127.0.0.1", 0, ssl=server_tls
    )
    try:
        port = server.sockets[0].getsockname()[1]
        conn = await connect(
            port, implicit_tls=True, tls_policy="verify", ssl_context=client_trusting
        )
        assert conn.tls_active
        assert (await conn.send(txn("a@mx.test"), b"x"))["a@mx.test"].code == 250
        await conn.quit()
    finally:
        server.close()


async def test_the_tls_context_of_a_policy_is_made_once_per_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # loading the system roots costs tens of ms of CPU: not once per connection
    made: list[bool] = []

    def counting(verify: bool, cafile: str | None = None) -> ssl.SSLContext:
        made.append(verify)
        return client_tls_context(verify, cafile)

    monkeypatch.setattr(smtp_connection, "client_tls_context", counting)
    smtp_connection._policy_context.cache_clear()
    try:
        async with aiosmtpd(Recorder()) as port:
            for _ in range(3):
                conn = await connect(port, tls_policy="may")
                await conn.quit()
    finally:
        smtp_connection._policy_context.cache_clear()
    assert made == [False]
