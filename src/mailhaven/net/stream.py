"""The one byte stream we own under asyncio: POP3 sessions and the SMTP client run on it.

In: transport callbacks (data, EOF, flow control, loss). Out: `read()` (whatever arrived, `b""`
at EOF, None after a silent `timeout` or on `stop()`), `write()`, `drain()` (waits, bounded,
while the transport is over its high-water mark), `start_tls()` (server or client side),
`close()` and `abort()`; `open_stream()` dials one for a client. The protocol cores above it
decide what the bytes mean; this class only moves them and bounds every wait.

Why not StreamReader/StreamWriter: Python 3.11's `StreamWriter.start_tls` leaves plaintext that
arrived before the handshake in the reader's buffer, the CVE-2011-0411 class of bug. Owning the
buffer makes the rule simple: `start_tls` empties it in the same synchronous step that hands the
transport to TLS (`loop.start_tls` pauses reading and swaps the protocol before its first
await), so no plaintext byte can be read as if it came over TLS and no decrypted byte is lost.

Backpressure both ways: reading pauses while more than MAX_INBOX bytes wait unread and resumes
when the reader takes them; `drain` blocks while the transport's write buffer is full, so a
large RETR or message body streams with a bounded footprint.

The SMTP server (`smtpd.session`) keeps its own `BufferedProtocol` (one shared receive buffer
for thousands of idle connections, no task per connection) under the same rules: its core
owns the input and drops plaintext before a STARTTLS handshake, reading pauses while a
decision is pending or the client does not read, and its handshake is this module's
`start_tls`, with the same checks and bounds.

SECURITY: the peer is untrusted. It can fill at most MAX_INBOX (plus one read) of our memory
before we stop reading, it cannot hold a `read` or `drain` past its timeout, and it cannot
hold a TLS handshake past `timeout` (+1 s of slack over the loop's own handshake timer).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any, Protocol, cast

#: Unread input we hold before pausing the transport (a pipelining peer can't flood us).
MAX_INBOX = 64 * 1024
#: How long a TLS handshake may take by default (implicit TLS, STLS, STARTTLS).
TLS_HANDSHAKE_TIMEOUT = 30.0


async def start_tls(
    transport: asyncio.Transport,
    protocol: asyncio.BaseProtocol,
    context: ssl.SSLContext,
    *,
    server_side: bool,
    server_hostname: str | None = None,
    timeout: float = TLS_HANDSHAKE_TIMEOUT,
) -> asyncio.Transport:
    """`loop.start_tls` with the checks every caller needs; the TLS transport, or an error.

    The caller must have dropped its unread input in the same synchronous step (the swap of
    protocols happens before this function's first await). Raises ConnectionResetError when
    the connection is closing already or is lost during the handshake, TimeoutError past
    `timeout`, ssl.SSLError when the handshake fails.
    """
    if transport.is_closing():
        # A handshake on a connection the peer already closed would wait for bytes that
        # never come (the loop reports no loss of a transport it already closed).
        raise ConnectionResetError("connection closed before the TLS handshake")
    loop = asyncio.get_running_loop()
    # The outer bound too: the loop's handshake timer does not cover every way a handshake
    # can stall (a peer that goes away while it is being set up).
    async with asyncio.timeout(timeout + 1):
        new = await loop.start_tls(
            transport,
            protocol,
            context,
            server_side=server_side,
            server_hostname=None if server_side else server_hostname,
            ssl_handshake_timeout=timeout,
        )
    if new is None:
        raise ConnectionResetError("connection lost during TLS handshake")
    return new


def _wake(waiter: asyncio.Future[None] | None) -> None:
    """Let a waiting `Stream.read` look again (input, EOF, loss, stop, or its timer)."""
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class Stream(asyncio.Protocol):
    """A byte stream whose receive buffer we own (see the module docstring).

    `on_connect` is called once with the stream when the transport is made (a listener's
    way to start a session).
    """

    def __init__(self, on_connect: Callable[[Stream], None] | None = None) -> None:
        self._on_connect = on_connect
        self.transport: asyncio.Transport | None = None
        self._inbox = bytearray()
        self._eof = False
        self._lost = False
        self._stopped = False
        #: what `read` waits on: resolved by input, EOF, loss, stop or its timer (None: no reader)
        self._waiter: asyncio.Future[None] | None = None
        self._write_ok = asyncio.Event()
        self._write_ok.set()
        self._reading_paused = False

    # -- transport callbacks --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a cast, not an isinstance check: uvloop's transports are not asyncio.Transport
        # subclasses, though they provide its interface (`mailhaven.runtime.eventloop`)
        self.transport = cast(asyncio.Transport, transport)
        if self._on_connect is not None:
            self._on_connect(self)

    def data_received(self, data: bytes) -> None:
        self._inbox += data
        _wake(self._waiter)
        if len(self._inbox) > MAX_INBOX and self.transport and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        self._eof = True
        _wake(self._waiter)
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = self._lost = True
        _wake(self._waiter)
        self._write_ok.set()

    def pause_writing(self) -> None:
        self._write_ok.clear()

    def resume_writing(self) -> None:
        self._write_ok.set()

    # -- the session's side ---------------------------------------------------------------------
    def extra(self, name: str) -> Any:
        """The transport's `get_extra_info(name)` (peername, sockname, ssl_object...)."""
        return self.transport.get_extra_info(name) if self.transport else None

    @property
    def closing(self) -> bool:
        """No more output will reach the peer: closed by either side, or lost."""
        return self._lost or self.transport is None or self.transport.is_closing()

    async def read(self, timeout: float) -> bytes | None:
        """What has arrived (b"" at EOF), or None after `timeout` seconds idle or on `stop()`."""
        if not self._inbox and not self._eof and not self._stopped:  # a timer only when we wait
            assert self._waiter is None, "one reader at a time"
            # One future and one timer per wait: half the calls of an Event under
            # asyncio.timeout(), and the relay client waits twice per message.
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(timeout, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        if self._stopped or (not self._inbox and not self._eof):
            return None  # stopped, or the timer fired
        data = bytes(self._inbox)
        self._inbox.clear()
        if self._reading_paused and self.transport and not self.transport.is_closing():
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        """Queue `data` for the peer; dropped once the connection is closing (a last word to a
        peer that is already gone is not an error)."""
        if data and self.transport and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self, timeout: float) -> None:
        """Wait until the peer has taken enough of our output: ConnectionResetError once the
        connection is lost, TimeoutError when the peer takes nothing for `timeout` seconds."""
        if self._lost:
            raise ConnectionResetError("connection lost")
        if not self._write_ok.is_set():  # over the high-water mark: wait, bounded
            async with asyncio.timeout(timeout):
                await self._write_ok.wait()
            if self._lost:
                raise ConnectionResetError("connection lost")

    async def start_tls(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        timeout: float = TLS_HANDSHAKE_TIMEOUT,
    ) -> None:
        """Upgrade to TLS; unread input (plaintext, by definition) is discarded first.

        The handshake must finish within `timeout` seconds (`[timeouts] tls_handshake`, or
        the SMTP client's STARTTLS timeout). Raises ConnectionResetError, TimeoutError or
        ssl.SSLError when it does not; the stream is then unusable.
        """
        assert self.transport is not None
        self._inbox.clear()  # same synchronous step as the protocol swap below: nothing slips in
        if self._eof:
            raise ConnectionResetError("connection closed before the TLS handshake")
        self._reading_paused = False  # `loop.start_tls` resumes reading on the transport it wraps
        self.transport = await start_tls(
            self.transport,
            self,
            context,
            server_side=server_side,
            server_hostname=server_hostname,
            timeout=timeout,
        )

    @property
    def stopping(self) -> bool:
        return self._stopped

    def stop(self) -> None:
        """Make the pending or next `read` return None (graceful shutdown)."""
        self._stopped = True
        _wake(self._waiter)

    def close(self) -> None:
        """Close after what was written has gone out."""
        if self.transport and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        """Close now, dropping unsent output."""
        if self.transport:
            self.transport.abort()


class Dialer(Protocol):
    """Opens a client's stream to one address: `open_stream` over TCP; tests pass a scripted
    stream instead (the seam that lets a client be tested without sockets)."""

    async def __call__(
        self,
        address: str,
        port: int,
        *,
        local_addr: tuple[str, int] | None,
        tls: ssl.SSLContext | None,
        server_hostname: str | None,
        handshake_timeout: float | None,
    ) -> Stream: ...


async def open_stream(
    address: str,
    port: int,
    *,
    local_addr: tuple[str, int] | None,
    tls: ssl.SSLContext | None,
    server_hostname: str | None,
    handshake_timeout: float | None,
) -> Stream:
    """A TCP connection (with implicit TLS when `tls` is given) on a `net.stream.Stream`."""
    loop = asyncio.get_running_loop()
    _, stream = await loop.create_connection(
        Stream,
        address,
        port,
        local_addr=local_addr,
        ssl=tls,
        server_hostname=server_hostname,
        ssl_handshake_timeout=handshake_timeout,
    )
    return stream


def unix_dialer(path: str) -> Dialer:
    """A `Dialer` that ignores the address and port and connects to the unix-domain socket at
    `path` (an LMTP store such as Dovecot's `/run/dovecot/lmtp`)."""

    async def dial(
        address: str,
        port: int,
        *,
        local_addr: tuple[str, int] | None,
        tls: ssl.SSLContext | None,
        server_hostname: str | None,
        handshake_timeout: float | None,
    ) -> Stream:
        loop = asyncio.get_running_loop()
        _, stream = await loop.create_unix_connection(
            Stream,
            path,
            ssl=tls,
            server_hostname=server_hostname,
            ssl_handshake_timeout=handshake_timeout,
        )
        return stream

    return dial
