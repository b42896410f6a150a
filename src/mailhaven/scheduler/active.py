"""The active queue (Postfix's, in small): what the scheduler holds in memory to deliver next.

Two kinds of recipients live here, both already known to be due:
- *fresh* mail: while there is room (fewer than `fresh_limit` messages and less than
  `FRESH_BYTES` of inline bodies), `commit` stores a new message with its recipients already
  claimed for the scheduler and keeps the stored message whole, so it is delivered without a
  queue read, a claim or a load (Postfix's cleanup handing a new message straight to qmgr;
  why it matters: docs/benchmarks.md). Without room, the message is committed plainly and the
  scheduler is woken to read the queue.
- the *backlog*: due recipients a plan had to leave because every usable slot was taken, so a
  freed slot is filled without reading the queue again.

This is the one seam between intake and the scheduler (`intake.cleanup.QueueDoor`): intake calls
`commit` once per message. The runner takes what is here into each plan (`take`), puts back what
found no slot (`keep`), and gives fresh recipients back to the spool (`give_back`) when the
operator changed the queue or the scheduler stops, so the spool's view wins again.

Invariants: a fresh recipient is claimed in the spool until it is delivered or given back;
memory is bounded by `fresh_limit` messages and `FRESH_BYTES` (plus one inline body each for
messages reserved but not yet offered).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from mailhaven.proto.envelope import Envelope
from mailhaven.scheduler.ports import ActiveSpool
from mailhaven.spool.message_writer import MessageWriter
from mailhaven.spool.records import (
    DueRecipient,
    FreshMessage,
    QueuedRecipient,
    RecipientKey,
    StoredMessage,
)

#: no new reservation while fresh mail holds this many inline body bytes (messages waiting for
#: a slot); the messages already reserved may add at most one spool inline limit each
FRESH_BYTES = 8 * 1024 * 1024


class ActiveQueue:
    """Fresh mail and the backlog, between intake and the runner."""

    def __init__(
        self,
        spool: ActiveSpool,
        *,
        wake: Callable[[], None],
        arrived: Callable[[], None] | None = None,
        max_deliveries: int = 0,
    ) -> None:
        self._spool = spool
        #: the scheduler must read the queue (plain commit)
        self._wake = wake
        #: fresh mail is here (no read needed)
        self._arrived = arrived or wake
        self.set_limit(max_deliveries)
        self.fresh: list[DueRecipient] = []
        self.messages: dict[str, StoredMessage] = {}
        self.backlog: tuple[DueRecipient, ...] = ()
        self._bytes = 0
        self._reserved = 0
        #: set by the runner: fresh mail is taken only while it runs and is not stopping
        self.running = False
        self.stopping = False

    def set_limit(self, max_deliveries: int) -> None:
        self.fresh_limit = max(64, 2 * max_deliveries)

    # -- intake's side ---------------------------------------------------------------------------
    async def commit(
        self,
        writer: MessageWriter,
        envelope: Envelope,
        recipients: Sequence[QueuedRecipient],
        header: bytes,
        *,
        attemptable: bool,
    ) -> None:
        """Make the message durable; hand it over whole when there is room, else wake the
        scheduler (`attemptable` False: every recipient is held, nothing to do now)."""
        if not attemptable or not self._reserve():
            await self._spool.commit(writer, envelope, recipients, header)
            if attemptable:
                self._wake()
            return
        try:
            fresh = await self._spool.commit_claimed(writer, envelope, recipients, header)
        finally:
            self._reserved -= 1
        self._offer(fresh)

    def _reserve(self) -> bool:
        if (
            self.stopping
            or not self.running
            or len(self.messages) + self._reserved >= self.fresh_limit
            or self._bytes >= FRESH_BYTES
        ):
            return False
        self._reserved += 1
        return True

    def _offer(self, fresh: FreshMessage) -> None:
        msg = fresh.message
        if not fresh.recipients:
            return
        if self.stopping:  # `give_back` already ran: do the same for this one
            keys = [r.key for r in fresh.recipients]
            task = asyncio.ensure_future(self._spool.unclaim(keys))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            return
        self.messages[msg.queue_id] = msg
        self._bytes += _held_size(msg)
        self.fresh.extend(fresh.recipients)
        self._arrived()

    # -- the runner's side -----------------------------------------------------------------------
    def take_fresh(self) -> list[DueRecipient]:
        fresh, self.fresh = self.fresh, []
        return fresh

    def keep(self, left: Sequence[DueRecipient], fresh_keys: set[RecipientKey]) -> None:
        """What a plan left: queue recipients become the backlog, fresh ones wait here
        (still claimed) ahead of later fresh mail."""
        self.backlog = tuple(r for r in left if r.key not in fresh_keys)
        self.fresh[:0] = [r for r in left if r.key in fresh_keys]

    def message(self, queue_id: str) -> StoredMessage | None:
        return self.messages.get(queue_id)

    def drop_dispatched(self) -> None:
        """Keep in memory only the messages that still have a fresh recipient waiting."""
        waiting = {r.queue_id for r in self.fresh}
        for qid in [q for q in self.messages if q not in waiting]:
            self._bytes -= _held_size(self.messages.pop(qid))

    async def give_back(self) -> None:
        """Unclaim the fresh recipients not dispatched (they are then read from the queue)."""
        keys = [r.key for r in self.fresh]
        self.fresh = []
        self.messages.clear()
        self._bytes = 0
        if keys:
            await self._spool.unclaim(keys)

    @property
    def held_bytes(self) -> int:
        return self._bytes


def _held_size(msg: StoredMessage) -> int:
    """What a message held in memory costs: its bytes if stored inline."""
    return msg.size if msg.inline_body is not None else 0
