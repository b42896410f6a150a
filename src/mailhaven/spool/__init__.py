"""The queue role's storage: what was accepted (`250`) survives a crash until it is delivered.

`store.Spool` is the facade: SQLite in WAL mode for envelopes and per-recipient state
(`schema`, `queries`, `records`), a group `committer` that makes many sessions' messages
durable with one fsync, body files for large messages (`message_writer`, CRC-checked),
`recovery` and `salvage` for what a crash or a damaged database leaves, `listing` for
`mailhaven queue list`, `shards` for one spool per engine process, `space` for the free-space
floor, and `lock` for the one daemon per state directory.

In: messages and recipient updates. Out: stored messages and due recipients. May import proto
only: the spool knows nothing of sessions, routes or agents. docs/durability.md gives each
write's guarantee.
"""

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
