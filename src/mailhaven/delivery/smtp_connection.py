"""Outbound SMTP over asyncio: drives `proto.smtp_client.ClientConnection` over a `net.stream`.

The delivery agents' SMTP client session (the relay agent today, an LMTP agent later): the
asyncio side of the sans-I/O client core, as `smtpd.session` is for the server core and
`pop3d.session` for POP3. It lives beside the agents that use it, not in `net/`, which holds
only the role-free pieces (the stream, TLS contexts, DNS).

In: a host (and optionally the address to dial), our HELO name, a TLS policy, optional
credentials; then `MailTransaction`s with their message bodies. Out: a `dict[str, Reply]` per
message, or a `SessionFailure` when no session could be set up (connect, greeting, EHLO, TLS,
AUTH), so the caller can move on to the next MX. The core decides what is legal; this module
owns the session's clock: every wait on the stream is bounded by the RFC 5321 §4.5.3.2
timeout of the phase the core reports (`Timeouts`).

TLS policy (Postfix's smtp_tls_security_level): "none" never; "may" STARTTLS when offered,
without certificate checks, and when the handshake fails the message goes again over a fresh
clear-text connection (RFC 7435); "encrypt" TLS required, unchecked; "verify" TLS required and
the certificate must match the host name. A caller-supplied `ssl_context` is used as given.

The body is streamed from a binary file in `BODY_CHUNK` pieces and written with backpressure,
so a 10 MiB message never sits in memory whole. Reading the spool file happens on the event
loop: a local 64 KiB read is cheaper than a thread hop.

SECURITY: the stream owns the receive buffer and empties it in the same synchronous step that
hands the transport to TLS, so clear text sent after the 220 to STARTTLS is never read as if
it came over TLS (CVE-2011-0411 class; see `net.stream`). Credentials go out only over TLS
unless `allow_plaintext_auth` is set.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO, Literal

from mailhaven.net.dns import parse_literal
from mailhaven.net.stream import Dialer, Stream, open_stream
from mailhaven.proto.replies import Reply
from mailhaven.proto.smtp_client import (
    Capabilities,
    ClientConnection,
    Closed,
    Credentials,
    Event,
    MailTransaction,
    Phase,
    Ready,
    SendBody,
    SessionFailed,
    StartTLS,
    StartTLSPolicy,
    Timeouts,
    TransactionDone,
    Wait,
)

log = logging.getLogger("mailhaven.smtp")

TLSPolicy = Literal["none", "may", "encrypt", "verify"]
#: How much of the body we read and hand to the transport at a time.
BODY_CHUNK = 64 * 1024
_CORE_POLICY = {
    "none": StartTLSPolicy.NEVER,
    "may": StartTLSPolicy.OPPORTUNISTIC,
    "encrypt": StartTLSPolicy.REQUIRED,
    "verify": StartTLSPolicy.REQUIRED,
}


def client_tls_context(verify: bool, cafile: str | None = None) -> ssl.SSLContext:
    """TLS 1.2+ (RFC 8996); with `verify`, the system (or `cafile`) roots and a host name check."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:  # opportunistic TLS: encryption against passive listeners only (RFC 7435)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


@functools.cache
def _policy_context(verify: bool) -> ssl.SSLContext:
    """The context of a TLS policy, made once per process: loading the system roots costs
    tens of milliseconds of CPU, too much for every new connection. Private, so that no
    caller can change the shared object (`client_tls_context` makes a fresh one)."""
    return client_tls_context(verify)


def _why(exc: BaseException) -> str:
    """The system's words for a socket error (strerror, as Postfix's %m), not Python's."""
    if isinstance(exc, TimeoutError):
        return "Connection timed out"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or "handshake failure"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return "Connection failed"


def connect_failure(relay: str, exc: BaseException) -> Reply:
    """Postfix's `connect to host[ip]:port: Connection refused`; an implicit-TLS handshake
    that fails is Postfix's `Cannot start TLS: handshake failure` (4.7.5)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        log.info("SSL_connect error to %s: %s", relay, _why(exc))
        return Reply(421, "Server certificate not verified", "4.7.5")
    if isinstance(exc, ssl.SSLError):
        log.info("SSL_connect error to %s: %s", relay, _why(exc))
        return Reply(421, "Cannot start TLS: handshake failure", "4.7.5")
    return Reply(421, f"connect to {relay}: {_why(exc)}", "4.4.1")


@dataclass(frozen=True, slots=True)
class SessionFailure:
    """No usable session: `phase` None means the TCP connection itself failed or closed;
    `relay` is "none" when no connection was made (as Postfix logs it)."""

    reply: Reply
    phase: Phase | None
    relay: str


class SMTPClientConnection:
    """One outbound session, reusable for several messages; use `connect()` to make one."""

    def __init__(
        self, core: ClientConnection, stream: Stream, relay: str, timeouts: Timeouts
    ) -> None:
        self._core = core
        self._stream = stream
        self.relay = relay  # host[ip]:port, for logs
        self.timeouts = timeouts

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int = 25,
        *,
        helo_name: str,
        address: str | None = None,
        tls_policy: TLSPolicy = "may",
        ssl_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        credentials: Credentials | None = None,
        allow_plaintext_auth: bool = False,
        source_address: tuple[str, int] | None = None,
        timeouts: Timeouts | None = None,
        dial: Dialer = open_stream,
        lmtp: bool = False,
    ) -> SMTPClientConnection | SessionFailure:
        """Dial `address` (default: `host`), then greeting, EHLO, STARTTLS and AUTH as needed.

        `host` names the peer for SNI, certificate checks and logs; domain literals work.
        Dialing a name (no `address`) uses the system resolver: the relay agent passes the
        address it got from `net.dns`. `lmtp` speaks LMTP (RFC 2033) instead of SMTP; a
        unix-domain socket is reached with `dial=net.stream.unix_dialer(path)`.
        """
        timeouts = timeouts or Timeouts()
        name = parse_literal(host) or host.lower().rstrip(".")
        to = address or name
        if ssl_context is None and (tls_policy != "none" or implicit_tls):
            ssl_context = _policy_context(verify=tls_policy == "verify")
        core_policy = _CORE_POLICY[tls_policy]
        for _ in range(2):  # the second round is the clear-text retry after a "may" failure
            core = ClientConnection(
                helo_name,
                peer=f"{name}[{to}]",
                starttls=core_policy,
                credentials=credentials,
                allow_plaintext_auth=allow_plaintext_auth,
                tls_active=implicit_tls,
                lmtp=lmtp,
            )
            relay = f"{name}[{to}]:{port}"
            try:
                async with asyncio.timeout(timeouts.connect):
                    stream = await dial(
                        to,
                        port,
                        local_addr=source_address,
                        tls=ssl_context if implicit_tls else None,
                        server_hostname=name if implicit_tls else None,
                        handshake_timeout=timeouts.starttls if implicit_tls else None,
                    )
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                return SessionFailure(connect_failure(relay, exc), None, "none")
            peer = stream.extra("peername")
            core.peer = f"{name}[{peer[0] if peer else to}]"
            relay = f"{core.peer}:{port}"
            conn = cls(core, stream, relay, timeouts)
            try:
                failure = await conn._setup(ssl_context, name)
            except BaseException:  # cancelled, or a bug: never leak the socket
                conn.close()
                raise
            if failure is None:
                return conn
            if tls_policy == "may" and failure.phase is Phase.TLS_HANDSHAKE and not implicit_tls:
                core_policy = StartTLSPolicy.NEVER
                continue
            return failure
        raise AssertionError("unreachable")

    # -- what the caller sees --------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        return self._core.capabilities

    @property
    def usable(self) -> bool:
        """Still connected and able to take another message."""
        return self._core.phase in (Phase.READY, Phase.RSET)

    @property
    def tls_active(self) -> bool:
        return self._core.tls_active

    @property
    def tls_info(self) -> str | None:
        """For logs, e.g. "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384"; None in clear text."""
        sslobj = self._stream.extra("ssl_object")
        if not isinstance(sslobj, ssl.SSLObject):
            return None
        cipher = sslobj.cipher()
        return f"{sslobj.version()} with cipher {cipher[0] if cipher else '?'}"

    async def send(
        self, txn: MailTransaction, message: BinaryIO | bytes | Iterable[bytes]
    ) -> dict[str, Reply]:
        """Send one message; one Reply per distinct recipient, never an exception for mail faults.

        On a dead session every recipient gets a 4xx, so the caller simply retries later.
        """
        if not await self._until_ready():
            reply = Reply(421, f"connection to {self.relay} is no longer usable", "4.4.2")
            return {r.address: reply for r in txn.recipients}
        try:
            self._core.start(txn)
            while True:
                event = await self._next_event()
                match event:
                    case SendBody():
                        await self._send_body(message)
                    case TransactionDone(results=results):
                        return dict(results)
                    case Ready() | StartTLS() | SessionFailed() | Closed() | Wait():
                        raise AssertionError(f"unexpected {event!r} in a transaction")
        except BaseException:  # cancelled, or the spool file failed: the session is unusable
            self.close()
            raise

    async def quit(self) -> None:
        """Say QUIT (when idle), wait briefly for the reply, close. Never raises."""
        try:
            if await self._until_ready():
                self._core.quit()
                while not isinstance(await self._next_event(), Closed):
                    pass
        finally:
            self._stream.close()

    def close(self) -> None:
        """Drop the connection without a word."""
        self._stream.close()

    async def __aenter__(self) -> SMTPClientConnection:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if t is None:
            await self.quit()
        else:
            self.close()

    # -- the pump ------------------------------------------------------------------------------
    async def _setup(self, ctx: ssl.SSLContext | None, name: str) -> SessionFailure | None:
        while True:
            event = await self._next_event()
            match event:
                case Ready():
                    return None
                case StartTLS():
                    assert ctx is not None
                    try:
                        await self._stream.start_tls(
                            ctx, server_side=False, server_hostname=name,
                            timeout=self.timeouts.starttls,
                        )
                    except (OSError, TimeoutError, ssl.SSLError) as exc:
                        log.info("SSL_connect error to %s: %s", self.relay, _why(exc))
                        unverified = isinstance(exc, ssl.SSLCertVerificationError)
                        self._core.tls_failed(_why(exc), unverified=unverified)
                    else:
                        self._core.tls_started()
                case SessionFailed(reply=reply, phase=phase):
                    self._stream.close()  # after the QUIT the core queued, already written
                    return SessionFailure(reply, phase, self.relay)
                case Closed():
                    self._stream.close()
                    reply = Reply(421, "connection closed during session setup", "4.4.2")
                    return SessionFailure(reply, None, self.relay)
                case TransactionDone() | SendBody() | Wait():
                    raise AssertionError(f"unexpected {event!r} during session setup")

    async def _until_ready(self) -> bool:
        """Consume a pending RSET reply; False when the session is over."""
        while self._core.phase is Phase.RSET:
            event = await self._next_event()
            if isinstance(event, SessionFailed | Closed):
                break
        if self._core.phase is Phase.READY:
            return True
        self._stream.close()
        return False

    async def _next_event(self) -> Event | Wait:
        while True:
            event = self._core.next_event()
            await self._flush()  # what the core said in answer, before we wait for more
            if event is not Wait.NEED_DATA:
                return event
            data = await self._stream.read(self.timeouts.for_phase(self._core.phase))
            if data is None:
                self._core.connection_lost(f"conversation with {self._core.peer} timed out")
            else:
                self._core.receive_data(data)

    async def _flush(self) -> bool:
        data = self._core.data_to_send()
        if not data:
            return True
        stream = self._stream
        try:
            # a peer that closed (or dropped) the connection takes no more commands: what
            # the core says next is about a lost connection, not a reply we wait for
            if stream.closing:
                raise ConnectionResetError("connection lost")
            stream.write(data)
            await stream.drain(self.timeouts.for_phase(self._core.phase))
            if stream.closing:
                raise ConnectionResetError("connection lost")
        except TimeoutError:
            self._core.connection_lost(f"conversation with {self._core.peer} timed out")
        except OSError:
            self._core.connection_lost(f"lost connection with {self._core.peer}")
        else:
            return True
        self._stream.close()
        return False

    async def _send_body(self, message: BinaryIO | bytes | Iterable[bytes]) -> None:
        if isinstance(message, bytes):
            view = memoryview(message)
            chunks: Iterable[bytes] = (
                bytes(view[i : i + BODY_CHUNK]) for i in range(0, len(view), BODY_CHUNK)
            )
        elif hasattr(message, "read"):
            chunks = iter(lambda: message.read(BODY_CHUNK), b"")
        else:
            chunks = message
        # Each chunk is written once the next one is known; the last goes out with the
        # end-of-data line, so a small body costs one write (and one read on the far side),
        # not two. Memory: one chunk more at most.
        held = False
        for chunk in chunks:
            if held and not await self._flush():
                return
            self._core.send_body(chunk)
            held = True
        self._core.end_body()
