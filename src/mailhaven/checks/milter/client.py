"""One connection to one milter: the asyncio adapter around `proto.milter.MilterConnection`.

In: stage calls made on `conn` by the chain, then `flush()`; `verdict()` waits for the next
reply. Out: protocol events, or `MilterDown` when the milter cannot be used (refused, closed,
garbage, or silent past the stage's timeout).

Invariants: the socket is owned here and only bytes move here; every wait is bounded by the
timeout the caller passes (a `Progress` from the milter restarts it, as libmilter's
SMFIR_PROGRESS is meant to); after `MilterDown` the connection is closed and stays unused.

SECURITY: the milter is trusted to judge mail, not to be well-behaved: what it sends goes
through the protocol core's checks, and it can never make a session wait past a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib

from mailhaven.checks.milter.settings import Endpoint
from mailhaven.proto.milter import MilterConnection
from mailhaven.proto.milter_events import Event, Failed, Negotiated, Progress
from mailhaven.proto.sansio import NEED_DATA, UsageError, Wait

#: bytes per read from a milter
READ_SIZE = 64 * 1024


class MilterDown(Exception):
    """The milter is unusable for the rest of the session; the text says why."""


class MilterClient:
    def __init__(self, endpoint: Endpoint, max_body: int) -> None:
        self.endpoint = endpoint
        self.conn = MilterConnection(max_body=max_body)
        self.down: str | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @property
    def name(self) -> str:
        return self.endpoint.spec

    async def open(self, timeout: float) -> Negotiated:
        """Connect and negotiate options, within `timeout` in all."""
        try:
            async with asyncio.timeout(timeout):
                if self.endpoint.is_unix:
                    self._reader, self._writer = await asyncio.open_unix_connection(
                        self.endpoint.host
                    )
                else:
                    self._reader, self._writer = await asyncio.open_connection(
                        self.endpoint.host, self.endpoint.port
                    )
        except TimeoutError:
            raise self._down("connect timed out") from None
        except OSError as err:
            raise self._down(f"connect failed: {err.strerror or err}") from None
        self.conn.negotiate()
        self.flush()
        event = await self.next_event(timeout)
        if not isinstance(event, Negotiated):
            raise self._down(f"unexpected {type(event).__name__} during option negotiation")
        return event

    def flush(self, at_least: int = 0) -> None:
        """Write what the core queued; with `at_least`, only once that much is queued (commands
        that owe no reply wait for the next one that does: fewer writes, same order)."""
        if self.conn.unsent < max(at_least, 1):
            return
        data = self.conn.data_to_send()
        if data and self._writer is not None and self.down is None:
            self._writer.write(data)

    async def drain(self, timeout: float) -> None:
        """Wait while more than the transport's high-water mark is unsent."""
        if self._writer is None or self.down is not None:
            return
        try:
            async with asyncio.timeout(timeout):
                await self._writer.drain()
        except TimeoutError:
            raise self._down("timed out writing") from None
        except (ConnectionError, OSError) as err:
            raise self._down(f"write failed: {err}") from None

    def ready_event(self) -> Event | Wait:
        """An event already received, without waiting; else the core's `Wait`."""
        event = self.conn.next_event()
        if isinstance(event, Failed):
            raise self._down(event.reason)
        return event

    async def next_event(self, timeout: float) -> Event:
        """The next protocol event (not `Progress`: that only restarts `timeout`)."""
        while True:
            event = self.conn.next_event()
            if isinstance(event, Failed):
                raise self._down(event.reason)
            if isinstance(event, Progress):
                continue  # the milter is alive: a fresh timeout from here
            if not isinstance(event, Wait):
                return event
            if self._reader is None or self.down is not None:
                raise self._down(self.down or "not connected")
            if event is not NEED_DATA:
                raise UsageError("waiting for a milter reply that no command owes")
            try:
                async with asyncio.timeout(timeout):
                    data = await self._reader.read(READ_SIZE)
            except TimeoutError:
                raise self._down(f"timeout after {timeout:g}s waiting for a reply") from None
            except (ConnectionError, OSError) as err:
                raise self._down(f"read failed: {err}") from None
            self.conn.receive_data(data)

    def _down(self, reason: str) -> MilterDown:
        if self.down is None:
            self.down = reason
        self.close()
        return MilterDown(f"milter {self.name}: {reason}")

    @property
    def reusable(self) -> bool:
        """Connected, in step (no reply owed, nothing unread) and not closed by the milter."""
        reader = self._reader
        return (
            self.down is None
            and reader is not None
            and not reader.at_eof()
            and self.conn.pending == 0
            and not self.conn.has_events
            and self.conn.version >= 6
        )

    def quit(self) -> None:
        """End the session politely (SMFIC_QUIT) and close."""
        if self.down is None and self._writer is not None:
            self.conn.quit()
            self.flush()
        self.close()

    def close(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None
            self._reader = None
