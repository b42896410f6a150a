"""The durable queue: ids, envelope records, commit, recovery, scan. See `store.Spool`."""

from mailhaven.spool.listing import list_queue
from mailhaven.spool.message_writer import MessageWriter
from mailhaven.spool.records import (
    DueRecipient,
    FreshMessage,
    Hold,
    MessageSummary,
    QueuedRecipient,
    RecipientKey,
    RecipientState,
    RecipientUpdate,
    Status,
    StoredMessage,
)
from mailhaven.spool.recovery import RecoveryReport
from mailhaven.spool.store import DEFAULT_INLINE_LIMIT, Spool

__all__ = [
    "DEFAULT_INLINE_LIMIT",
    "DueRecipient",
    "FreshMessage",
    "Hold",
    "MessageSummary",
    "MessageWriter",
    "QueuedRecipient",
    "RecipientKey",
    "RecipientState",
    "RecipientUpdate",
    "RecoveryReport",
    "Spool",
    "Status",
    "StoredMessage",
    "list_queue",
]
