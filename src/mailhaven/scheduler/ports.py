"""The scheduler's narrow views of its neighbours: what it needs from the spool, and the hooks
it calls (bounces and delay warnings are the notifier's job, not the scheduler's).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from mailhaven.proto.envelope import Envelope
from mailhaven.spool.message_writer import MessageWriter
from mailhaven.spool.records import (
    DueRecipient,
    FreshMessage,
    Hold,
    QueuedRecipient,
    RecipientKey,
    RecipientState,
    RecipientUpdate,
    StoredMessage,
)

#: Called once per message when nothing is left to do and some recipients failed for good:
#: (the stored message, still readable; its bounced recipients with their last replies).
#: The same shape serves `on_delay`: called at most once per message, when a recipient is
#: deferred and the message is older than the policy's `delay_warning` (with the deferred ones).
OnFailures = Callable[[StoredMessage, Sequence[RecipientState]], Awaitable[None]]


class ActiveSpool(Protocol):
    """What the active queue needs from the spool."""

    async def commit(
        self,
        writer: MessageWriter,
        envelope: Envelope,
        recipients: Sequence[QueuedRecipient],
        header: bytes,
    ) -> str: ...

    async def commit_claimed(
        self,
        writer: MessageWriter,
        envelope: Envelope,
        recipients: Sequence[QueuedRecipient],
        header: bytes,
    ) -> FreshMessage: ...

    async def unclaim(self, keys: Sequence[RecipientKey]) -> None: ...


class SchedulerSpool(ActiveSpool, Protocol):
    """What the scheduler needs from the spool (`mailhaven.spool.Spool` provides it)."""

    async def due(self, now: float, limit: int) -> list[DueRecipient]: ...
    async def next_due_time(self) -> float | None: ...
    async def claim(self, keys: Sequence[RecipientKey]) -> list[RecipientKey]: ...
    async def unclaim(self, keys: Sequence[RecipientKey]) -> None: ...
    async def hold_recipients(self, keys: Sequence[RecipientKey], reason: Hold) -> None: ...
    async def record(self, queue_id: str, updates: Sequence[RecipientUpdate]) -> int: ...
    async def record_and_finish(
        self, queue_id: str, updates: Sequence[RecipientUpdate]
    ) -> tuple[int, bool]: ...
    async def load(self, queue_id: str) -> StoredMessage | None: ...
    async def load_to_send(self, queue_id: str) -> StoredMessage | None: ...
    async def recipients(self, queue_id: str) -> list[RecipientState]: ...
    async def finished(self) -> list[str]: ...
    async def mark_warned(self, queue_id: str) -> bool: ...
    async def remove(self, queue_id: str) -> bool: ...
