"""The asyncio SMTP adapter, in-process over loopback: containment, TLS, timeouts, AUTH."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import smtplib
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import trustme

from mailhaven.checks.auth_failures import AuthLimiter
from mailhaven.config import Limits, Timeouts
from mailhaven.mailbox.users import UserDB
from mailhaven.net.tls import ReloadableTLS
from mailhaven.proto import smtp_server_events as ev
from mailhaven.proto.envelope import Envelope
from mailhaven.proto.replies import Reply
from mailhaven.proto.smtp_server import ServerSettings
from mailhaven.routing.router import Router
from mailhaven.smtpd import server as server_module
from mailhaven.smtpd.auth import SMTPAuthenticator
from mailhaven.smtpd.policy import PolicySettings, SessionFacts, SMTPPolicy
from mailhaven.smtpd.profile import ListenerProfile, Writer
from mailhaven.smtpd.server import SMTPService


@dataclass
class MemoryWriter:
    queue_id: str
    data: bytearray = field(default_factory=bytearray)
    aborted: bool = False
    no_bare_cr: bool = False

    def write(self, data: bytes) -> None:
        self.data += data

    def abort(self) -> None:
        self.aborted = True


@dataclass
class MemorySink:
    messages: list[tuple[Envelope, bytes, str | None]] = field(default_factory=list)
    count: int = 0
    #: each accepted writer's `no_bare_cr`, in order
    clean: list[bool] = field(default_factory=list)

    def new_message(self) -> Writer:
        self.count += 1
        return MemoryWriter(f"Q{self.count}")

    async def accept(
        self, writer: Writer, envelope: Envelope, tls: str | None, added: bytes = b""
    ) -> Reply:
        assert isinstance(writer, MemoryWriter)
        self.messages.append((envelope, bytes(writer.data), tls))
        self.clean.append(writer.no_bare_cr)
        return Reply(250, f"Ok: queued as {writer.queue_id}", "2.0.0")


class ExplodingPolicy(SMTPPolicy):
    def rcpt_to(self, facts: SessionFacts, event: ev.RcptTo) -> Reply | None:
        if event.address.startswith("boom"):
            raise RuntimeError("policy bug")
        return super().rcpt_to(facts, event)


def router() -> Router:
    return Router(
        local_domains=["localhost"],
        mailboxes=lambda: {"postmaster", "alice"},
        trusted_networks=["127.0.0.0/8"],
    )


@dataclass
class Harness:
    service: SMTPService
    sink: MemorySink
    port: int


CA = trustme.CA()
CERT = CA.issue_cert("localhost", "127.0.0.1")


def server_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    CERT.configure_cert(ctx)
    return ctx


def client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    CA.configure_trust(ctx)
    return ctx


async def start(
    profile: Callable[[], ListenerProfile],
    *,
    limits: Limits | None = None,
    timeouts: Timeouts | None = None,
) -> Harness:
    sink = MemorySink()
    service = SMTPService(sink=sink, limits=limits or Limits(), timeouts=timeouts or Timeouts())
    await service.listen("127.0.0.1:0", profile)
    return Harness(service, sink, service.addresses[0][1])


def mx_profile(policy_cls: type[SMTPPolicy] = SMTPPolicy, **settings: object) -> ListenerProfile:
    return ListenerProfile(
        name="smtp",
        settings=replace(ServerSettings(hostname="mx.test"), **settings),  # type: ignore[arg-type]
        policy=policy_cls(router, PolicySettings()),
        tls_context=server_tls,
    )


@pytest.fixture
async def mx() -> AsyncIterator[Harness]:
    h = await start(lambda: mx_profile(ExplodingPolicy, starttls=True))
    yield h
    await h.service.shutdown(grace=0.5)


def send_with_smtplib(port: int, rcpts: list[str]) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        return client.sendmail("a@example.org", rcpts, b"Subject: x\r\n\r\nhello\r\n")


async def test_policy_exception_answers_451_and_session_continues(mx: Harness) -> None:
    refused = await asyncio.to_thread(
        send_with_smtplib, mx.port, ["boom@localhost", "alice@localhost"]
    )
    assert refused == {"boom@localhost": (451, b"4.3.0 Error: internal error, try again later")}
    envelope, body, _ = mx.sink.messages[0]
    assert [r.address for r in envelope.recipients] == ["alice@localhost"]
    assert body == b"Subject: x\r\n\r\nhello\r\n"


async def test_a_body_the_framing_accepted_is_marked_free_of_bare_crs(mx: Harness) -> None:
    """The local copy relies on this mark to delete every CR without searching (maildir)."""
    await asyncio.to_thread(send_with_smtplib, mx.port, ["alice@localhost"])
    assert mx.sink.clean == [True]


async def test_starttls_pipelined_plaintext_is_never_answered_inside_tls(mx: Harness) -> None:
    def talk() -> list[bytes]:
        with socket.create_connection(("127.0.0.1", mx.port), timeout=10) as raw:
            f = raw.makefile("rb")
            assert f.readline().startswith(b"220")
            raw.sendall(b"EHLO c\r\n")
            while not f.readline().startswith(b"250 "):
                pass
            raw.sendall(b"STARTTLS\r\nNOOP\r\nMAIL FROM:<evil@x>\r\n")  # one packet
            assert f.readline().startswith(b"220 2.0.0")
            tls = client_tls().wrap_socket(raw, server_hostname="localhost")
            tls.sendall(b"NOOP\r\n")
            tf = tls.makefile("rb")
            first = tf.readline()
            tls.sendall(b"QUIT\r\n")
            return [first, tf.readline()]

    lines = await asyncio.to_thread(talk)
    # The only answers inside TLS are to what was sent inside TLS: one NOOP, then QUIT.
    assert lines == [b"250 2.0.0 Ok\r\n", b"221 2.0.0 Bye\r\n"]


async def test_tls_recorded_for_received_header(mx: Harness) -> None:
    def send() -> None:
        with smtplib.SMTP("127.0.0.1", mx.port, timeout=10) as client:
            client.starttls(context=client_tls())
            client.sendmail("a@example.org", ["alice@localhost"], b"Subject: t\r\n\r\nx\r\n")

    await asyncio.to_thread(send)
    envelope, _, tls = mx.sink.messages[0]
    assert tls is not None and tls.startswith("using TLSv1.")
    assert envelope.protocol == "ESMTPS"


async def test_idle_client_gets_421_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "REAPER_INTERVAL", 0.05)
    h = await start(mx_profile, timeouts=Timeouts(command=0.2))
    h.service._reaper = asyncio.ensure_future(h.service._reap())
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        assert (await reader.readline()).startswith(b"220")
        line = await asyncio.wait_for(reader.readline(), 5)
        assert line.startswith(b"421 4.4.2 mx.test Error: timeout exceeded")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        await h.service.shutdown(grace=0.2)


async def test_connection_limit_per_ip() -> None:
    h = await start(mx_profile, limits=Limits(connections_per_ip=2))
    try:
        conns = [await asyncio.open_connection("127.0.0.1", h.port) for _ in range(3)]
        greetings = [await asyncio.wait_for(r.readline(), 5) for r, _ in conns]
        assert [g[:3] for g in greetings] == [b"220", b"220", b"421"]
        for _, w in conns:
            w.close()
    finally:
        await h.service.shutdown(grace=0.2)


async def test_graceful_shutdown_lets_the_transaction_finish() -> None:
    h = await start(mx_profile, timeouts=Timeouts(shutdown_grace=5))
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
    await reader.readline()
    for line in (
        b"HELO c\r\n",
        b"MAIL FROM:<a@x.test>\r\n",
        b"RCPT TO:<alice@localhost>\r\n",
        b"DATA\r\n",
    ):
        writer.write(line)
        await writer.drain()
        await reader.readline()
    stopping = asyncio.ensure_future(h.service.shutdown())
    await asyncio.sleep(0.1)
    writer.write(b"Subject: late\r\n\r\nbody\r\n.\r\n")
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"250 2.0.0 Ok: queued")
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"421 4.3.2")
    await asyncio.wait_for(stopping, 5)
    assert len(h.sink.messages) == 1


async def test_auth_plain_login_and_brute_force_brake(tmp_path: Path) -> None:
    users = UserDB(tmp_path / "users.passwd")
    users.add("alice", "s3cret")
    limiter = AuthLimiter(max_failures=3, window=60, failure_delay=0.01)
    auth = SMTPAuthenticator(users, limiter)

    def profile() -> ListenerProfile:
        return ListenerProfile(
            name="submissions",
            settings=ServerSettings(
                hostname="mx.test", tls_on_connect=True, auth_mechanisms=("PLAIN", "LOGIN")
            ),
            policy=SMTPPolicy(router, PolicySettings(require_auth=True, sender_login_check=True)),
            tls_context=server_tls,
            authenticator=auth,
        )

    sink = MemorySink()
    service = SMTPService(sink=sink, limits=Limits(), timeouts=Timeouts())
    await service.listen("127.0.0.1:0", profile, implicit_tls=True)
    port = service.addresses[0][1]

    def session(password: str) -> int:
        with smtplib.SMTP_SSL("127.0.0.1", port, context=client_tls(), timeout=10) as c:
            c.ehlo()
            token = base64.b64encode(f"\0alice\0{password}".encode()).decode()
            code, _ = c.docmd("AUTH", f"PLAIN {token}")  # exactly one attempt
            if code != 235:
                return code
            c.sendmail("alice@localhost", ["someone@example.net"], b"Subject: a\r\n\r\nb\r\n")
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                c.sendmail("bob@localhost", ["x@example.net"], b"Subject: a\r\n\r\nb\r\n")
            assert refused.value.smtp_code == 553
            return code

    try:
        assert await asyncio.to_thread(session, "s3cret") == 235
        assert [m[0].auth_user for m in sink.messages] == ["alice"]
        assert sink.messages[0][0].protocol == "ESMTPSA"
        codes = [await asyncio.to_thread(session, "wrong") for _ in range(4)]
        assert codes[:3] == [535, 535, 535]
        assert codes[3] == 454  # blocked now, even before any hash is computed
        assert await asyncio.to_thread(session, "s3cret") == 454  # the user stays blocked
    finally:
        await service.shutdown(grace=0.2)


# ---------------------------------------------------------------- STARTTLS that never completes


def starttls_sent(port: int) -> socket.socket:
    """A plaintext connection that has said EHLO and STARTTLS and read `220 Ready`: the next
    bytes on it belong to the TLS handshake."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = raw.makefile("rb")
    assert f.readline().startswith(b"220")
    raw.sendall(b"EHLO client.test\r\n")
    while not f.readline().startswith(b"250 "):
        pass
    raw.sendall(b"STARTTLS\r\n")
    assert f.readline().startswith(b"220 2.0.0")
    return raw


def _stalled_starttls(port: int, ending: str) -> None:
    """STARTTLS, read 220, then end as an attacker would: reset, silence, or not TLS at all."""
    raw = starttls_sent(port)
    match ending:
        case "reset":
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            raw.close()
        case "garbage":
            raw.sendall(b"this is not a TLS ClientHello\r\n" * 4)
            raw.settimeout(10)
            with contextlib.suppress(OSError):
                while raw.recv(4096):
                    pass
            raw.close()
        case "silent":
            raw.settimeout(10)
            with contextlib.suppress(OSError):
                assert raw.recv(4096) == b""  # the server gives up on the handshake
            raw.close()


@pytest.mark.both_loops
@pytest.mark.parametrize("ending", ["reset", "garbage", "silent"])
async def test_starttls_that_never_completes_releases_its_slot(ending: str) -> None:
    # Rule of the session: every path out releases the slot exactly once. With a limit of 4
    # connections, 12 clients that each die inside the handshake must leave all 4 free.
    h = await start(
        lambda: mx_profile(starttls=True),
        limits=Limits(connections=4, connections_per_ip=4),
        timeouts=Timeouts(tls_handshake=0.5),
    )
    try:
        for _ in range(3):
            await asyncio.gather(
                *(asyncio.to_thread(_stalled_starttls, h.port, ending) for _ in range(4))
            )
            for _ in range(100):
                if not h.service.sessions:
                    break
                await asyncio.sleep(0.05)
        assert not h.service.sessions and not h.service.per_ip
        refused = await asyncio.to_thread(send_with_smtplib, h.port, ["alice@localhost"])
        assert refused == {}
    finally:
        await h.service.shutdown(grace=0.2)


# ---------------------------------------------------------------- TLS edges


def finished_command_and_close_notify(port: int) -> bytes:
    """A memory-BIO TLS client that sends its Finished, `EHLO` and close_notify in one
    `send` (one TCP segment); returns what the server sent back after it, decrypted."""
    with starttls_sent(port) as sock:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client_tls().wrap_bio(incoming, outgoing, server_hostname="localhost")
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if pending := outgoing.read():
                    sock.sendall(pending)
                incoming.write(sock.recv(65536))
        tls.write(b"EHLO client.test\r\n")
        with pytest.raises(ssl.SSLWantReadError):
            tls.unwrap()  # queues close_notify, then waits for the server's
        sock.sendall(outgoing.read())  # Finished + EHLO + close_notify: one segment
        answer = b""
        while data := sock.recv(65536):
            incoming.write(data)
            with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                while chunk := tls.read(65536):
                    answer += chunk
        return answer


@pytest.mark.both_loops
async def test_finished_command_and_close_notify_in_one_segment(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 16 #21: asyncio hands over the command and the EOF before `start_tls` returns;
    that is a normal close: no traceback, every slot released, the next client served."""
    h = await start(
        lambda: mx_profile(starttls=True), limits=Limits(connections=4, connections_per_ip=4)
    )
    try:
        for _ in range(5):
            await asyncio.to_thread(finished_command_and_close_notify, h.port)
        for _ in range(100):
            if not h.service.sessions:
                break
            await asyncio.sleep(0.05)
        assert not h.service.sessions and not h.service.per_ip
        assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
        assert "ProtocolUsageError" not in caplog.text
        refused = await asyncio.to_thread(send_with_smtplib, h.port, ["alice@localhost"])
        assert refused == {}
    finally:
        await h.service.shutdown(grace=0.2)


async def trickle(writer: asyncio.StreamWriter, data: bytes, reader: asyncio.StreamReader) -> bytes:
    """Send `data` a byte every 0.1 s (well within the idle timeout) until the server answers
    or hangs up; what it answered (bounded: at most len(data) bytes are sent)."""
    for byte in data:
        try:
            return await asyncio.wait_for(reader.readline(), 0.1)
        except TimeoutError:
            writer.write(bytes([byte]))
    return await asyncio.wait_for(reader.readline(), 5)


@pytest.mark.both_loops
async def test_trickling_clients_hit_the_command_and_message_deadlines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 16 #22: a client sending a byte every 0.1 s never trips the 2 s idle timeout, yet
    is cut with 421 4.4.2 by the deadline for a whole command (0.8 s) or message (1.2 s);
    a normal client meanwhile is served."""
    monkeypatch.setattr(server_module, "REAPER_INTERVAL", 0.05)
    timeouts = Timeouts(command=2.0, data=2.0, command_deadline=0.8, message_deadline=1.2)
    h = await start(mx_profile, timeouts=timeouts)
    h.service._reaper = asyncio.ensure_future(h.service._reap())

    async def command_trickler() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        assert (await reader.readline()).startswith(b"220")
        answer = await trickle(writer, b"EHLO " + b"x" * 60 + b"\r\n", reader)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # and disconnected
        writer.close()
        return answer

    async def message_trickler() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        assert (await reader.readline()).startswith(b"220")
        for command in (
            b"HELO c.test",
            b"MAIL FROM:<a@example.org>",
            b"RCPT TO:<alice@localhost>",
            b"DATA",
        ):
            writer.write(command + b"\r\n")
            assert (await asyncio.wait_for(reader.readline(), 5))[:1] in (b"2", b"3")
        answer = await trickle(writer, b"Subject: slow\r\n\r\n" + b"y" * 60 + b"\r\n.\r\n", reader)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        return answer

    try:
        command_cut, message_cut, refused = await asyncio.gather(
            command_trickler(),
            message_trickler(),
            asyncio.to_thread(send_with_smtplib, h.port, ["alice@localhost"]),
        )
        assert command_cut.startswith(b"421 4.4.2 mx.test Error: timeout exceeded"), command_cut
        assert message_cut.startswith(b"421 4.4.2 mx.test Error: timeout exceeded"), message_cut
        assert refused == {}
        assert len(h.sink.messages) == 1  # only the normal client's message
        for _ in range(100):  # the last disconnect may still be on its way
            if not h.service.sessions:
                break
            await asyncio.sleep(0.05)
        assert not h.service.sessions
    finally:
        await h.service.shutdown(grace=0.2)


@pytest.mark.both_loops
async def test_shutdown_during_a_starttls_handshake_writes_no_plaintext() -> None:
    # A client inside its handshake at shutdown: a plaintext 421 would land in its TLS layer
    # as garbage. It gets the connection cut instead, and the slot is released.
    h = await start(lambda: mx_profile(starttls=True), timeouts=Timeouts(tls_handshake=30))

    def stalled() -> bytes:
        with starttls_sent(h.port) as raw:
            ready.set()
            rest = b""
            with contextlib.suppress(OSError):
                while chunk := raw.recv(4096):
                    rest += chunk
            return rest

    ready = threading.Event()
    client = asyncio.ensure_future(asyncio.to_thread(stalled))
    await asyncio.to_thread(ready.wait, 10)
    await asyncio.sleep(0.1)
    await h.service.shutdown(grace=0.2)
    assert await asyncio.wait_for(client, 10) == b""
    for _ in range(100):  # the handshake's failure path runs once the abort is seen
        if not h.service.sessions:
            break
        await asyncio.sleep(0.05)
    assert not h.service.sessions


async def test_an_authenticator_error_answers_454_and_the_session_continues(
    tmp_path: Path,
) -> None:
    """A failure inside the password check (e.g. the users file cannot be read) used to leave
    AUTH without any reply: the session's error path answered it like a plain command, which
    the protocol core refuses during AUTH."""

    class BrokenUsers(UserDB):
        async def verify(self, user: str, password: str) -> bool:
            raise RuntimeError("users file unreadable")

    auth = SMTPAuthenticator(BrokenUsers(tmp_path / "users.passwd"), AuthLimiter())

    def profile() -> ListenerProfile:
        return ListenerProfile(
            name="submissions",
            settings=ServerSettings(
                hostname="mx.test", tls_on_connect=True, auth_mechanisms=("PLAIN",)
            ),
            policy=SMTPPolicy(router, PolicySettings(require_auth=True)),
            tls_context=server_tls,
            authenticator=auth,
        )

    service = SMTPService(sink=MemorySink(), limits=Limits(), timeouts=Timeouts())
    await service.listen("127.0.0.1:0", profile, implicit_tls=True)
    port = service.addresses[0][1]

    def session() -> list[int]:
        with smtplib.SMTP_SSL("127.0.0.1", port, context=client_tls(), timeout=10) as c:
            c.ehlo()
            token = base64.b64encode(b"\0alice\0pw").decode()
            return [c.docmd("AUTH", f"PLAIN {token}")[0], c.noop()[0]]

    try:
        assert await asyncio.to_thread(session) == [454, 250]
    finally:
        await service.shutdown(grace=0.2)


# ---------------------------------------------------------------- STARTTLS session resumption


def ehlo_quit_over_starttls(
    port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[bool, ssl.SSLSession | None]:
    """STARTTLS offering `session`, EHLO, QUIT: (was it resumed?, the session to offer next,
    taken after a reply so that TLS 1.3's tickets have arrived)."""
    with starttls_sent(port) as raw, ctx.wrap_socket(
        raw, server_hostname="localhost", session=session
    ) as tls:
        f = tls.makefile("rb")
        tls.sendall(b"EHLO client.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        tls.sendall(b"QUIT\r\n")
        assert f.readline().startswith(b"221")
        return tls.session_reused, tls.session


@pytest.mark.both_loops
async def test_a_returning_sender_resumes_its_tls_session(tmp_path: Path) -> None:
    """What makes a returning MX client's STARTTLS cheap: the listener's reloadable context
    (its SNI callback swaps in the current certificate) issues tickets the next handshake
    accepts, also after the certificate was reloaded."""
    pem = tmp_path / "c.pem"
    CERT.private_key_and_cert_chain_pem.write_to_path(str(pem))
    tls = ReloadableTLS(pem, pem)
    h = await start(lambda: replace(mx_profile(starttls=True), tls_context=lambda: tls.context))
    try:
        ctx = client_tls()
        first, session = await asyncio.to_thread(ehlo_quit_over_starttls, h.port, ctx, None)
        again, session = await asyncio.to_thread(ehlo_quit_over_starttls, h.port, ctx, session)
        tls.reload()
        after_reload, _ = await asyncio.to_thread(ehlo_quit_over_starttls, h.port, ctx, session)
        assert (first, again, after_reload) == (False, True, True)
    finally:
        await h.service.shutdown(grace=0.2)
