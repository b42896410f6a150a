"""The byte stream under a POP3 session: an asyncio.Protocol that owns its input buffer.

In: transport callbacks (data, EOF, flow control, loss). Out: `read()` (whatever arrived, `b""` at
EOF, None on timeout or stop), `write()`, `drain()` (waits while the transport is over its
high-water mark), `start_tls()` and `close()`.

Why not StreamReader/StreamWriter: Python 3.11's `StreamWriter.start_tls` leaves plaintext that
arrived before the handshake in the reader's buffer, the CVE-2011-0411 class of bug. Owning the
buffer makes the rule simple: `start_tls` empties it in the same synchronous step that hands the
transport to TLS (`loop.start_tls` pauses reading and swaps the protocol before its first await),
so no plaintext byte can reach the session after STLS and no decrypted byte is lost.

Backpressure both ways: reading pauses while more than MAX_INBOX bytes wait unread; `drain`
blocks while the transport's write buffer is full, so RETR of a large message streams with a
bounded footprint.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any, cast

#: Unread input we hold before pausing the transport (a pipelining client can't flood us).
MAX_INBOX = 64 * 1024
#: How long a TLS handshake may take (implicit TLS and STLS).
TLS_HANDSHAKE_TIMEOUT = 30.0


class Stream(asyncio.Protocol):
    def __init__(self, on_connect: Callable[[Stream], None] | None = None) -> None:
        self._on_connect = on_connect
        self.transport: asyncio.Transport | None = None
        self._inbox = bytearray()
        self._eof = False
        self._stopped = False
        self._wakeup = asyncio.Event()
        self._write_ok = asyncio.Event()
        self._write_ok.set()
        self._reading_paused = False
        self.closed = asyncio.get_running_loop().create_future()

    # -- transport callbacks --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a cast, not an isinstance check: uvloop's transports are not asyncio.Transport
        # subclasses, though they provide its interface (`mailhaven.runtime.eventloop`)
        self.transport = cast(asyncio.Transport, transport)
        if self._on_connect is not None:
            self._on_connect(self)

    def data_received(self, data: bytes) -> None:
        self._inbox += data
        self._wakeup.set()
        if len(self._inbox) > MAX_INBOX and self.transport and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wakeup.set()
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._wakeup.set()
        self._write_ok.set()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_ok.clear()

    def resume_writing(self) -> None:
        self._write_ok.set()

    # -- session side ---------------------------------------------------------------------------
    def extra(self, name: str) -> Any:
        return self.transport.get_extra_info(name) if self.transport else None

    async def read(self, timeout: float) -> bytes | None:
        """What has arrived (b"" at EOF), or None after `timeout` seconds idle or on `stop()`."""
        try:
            async with asyncio.timeout(timeout):
                while not self._inbox and not self._eof and not self._stopped:
                    self._wakeup.clear()
                    await self._wakeup.wait()
        except TimeoutError:
            return None
        if self._stopped:
            return None
        data = bytes(self._inbox)
        del self._inbox[:]
        if self._reading_paused and self.transport and not self.transport.is_closing():
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        if data and self.transport and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self, timeout: float) -> None:
        """Wait until the peer has taken enough of our output; raise if it is gone or stuck."""
        if self.closed.done():
            raise ConnectionResetError("connection lost")
        if not self._write_ok.is_set():
            async with asyncio.timeout(timeout):
                await self._write_ok.wait()
            if self.closed.done():
                raise ConnectionResetError("connection lost")

    async def start_tls(
        self, context: ssl.SSLContext, timeout: float = TLS_HANDSHAKE_TIMEOUT
    ) -> None:
        """Upgrade to TLS as the server; plaintext received before this call is discarded.
        The handshake must finish within `timeout` seconds (`[timeouts] tls_handshake`)."""
        assert self.transport is not None
        del self._inbox[:]  # same synchronous step as the protocol swap below: nothing slips in
        if self._eof or self.transport.is_closing():
            # A handshake on a connection the client already closed would wait for bytes
            # that never come (the loop reports no loss of a transport it already closed).
            raise ConnectionResetError("connection closed before the TLS handshake")
        loop = asyncio.get_running_loop()
        # The outer bound too: the loop's handshake timer does not cover every way a
        # handshake can stall (a peer that goes away while it is being set up).
        async with asyncio.timeout(timeout + 1):
            new = await loop.start_tls(
                self.transport, self, context, server_side=True, ssl_handshake_timeout=timeout,
            )
        if new is None:
            raise ConnectionResetError("connection lost during TLS handshake")
        self.transport = new

    @property
    def stopping(self) -> bool:
        return self._stopped

    def stop(self) -> None:
        """Make the pending or next `read` return None (graceful shutdown)."""
        self._stopped = True
        self._wakeup.set()

    def close(self) -> None:
        if self.transport and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport:
            self.transport.abort()
