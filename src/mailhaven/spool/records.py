"""The small records the spool takes and gives: what goes in at commit, what the scheduler reads
back and writes, what `mailq` lists.

Everything here is a frozen dataclass of plain values, so the records could cross a process
boundary unchanged. Statuses are stored as their string values in SQLite.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from mailhaven.proto.envelope import Envelope
from mailhaven.proto.replies import Reply
from mailhaven.spool.message_writer import open_stored


class Status(enum.StrEnum):
    """Where one recipient stands. Only PENDING and DEFERRED recipients are ever attempted."""

    #: never attempted yet (new mail)
    PENDING = "pending"
    #: attempted, failed temporarily; waiting for `next_attempt`
    DEFERRED = "deferred"
    #: delivered (2xx): done
    SENT = "sent"
    #: failed for good (5xx, or temporary failures past the queue lifetime): done, bounce due
    BOUNCED = "bounced"

    @property
    def unfinished(self) -> bool:
        return self in (Status.PENDING, Status.DEFERRED)


class Hold(enum.IntFlag):
    """Why a recipient is not attempted even when due. Stored as an integer bit set.

    The reasons are independent: releasing an administrative hold leaves a route hold in place.
    """

    NONE = 0
    #: routed to the "hold" transport (part-time host, released by ETRN / `release_domain`)
    ROUTE = 1
    #: held by the administrator (`hold`/`release`, like `postsuper -h/-H`)
    ADMIN = 2
    #: the stored message is damaged; see the spool's quarantine/ directory
    QUARANTINE = 4


@dataclass(frozen=True, slots=True)
class QueuedRecipient:
    """One final recipient as handed to `Spool.commit` (after alias expansion)."""

    address: str
    #: the envelope recipient this one was expanded from (the DSN "original recipient")
    original: str
    #: NOTIFY= and ORCPT= of the original envelope recipient (RFC 3461), carried for the DSN
    notify: tuple[str, ...] = ()
    orcpt: tuple[str, str] | None = None
    hold: Hold = Hold.NONE


@dataclass(frozen=True, slots=True)
class RecipientKey:
    queue_id: str
    index: int


@dataclass(frozen=True, slots=True)
class DueRecipient:
    """A recipient the scheduler may attempt now (not held, not already in flight)."""

    queue_id: str
    index: int
    address: str
    original: str
    attempts: int
    arrival: float
    next_attempt: float

    @property
    def key(self) -> RecipientKey:
        return RecipientKey(self.queue_id, self.index)


@dataclass(frozen=True, slots=True)
class RecipientUpdate:
    """The scheduler's verdict on one recipient after an attempt (or a decision not to try)."""

    index: int
    status: Status
    #: when to try again (DEFERRED only); ignored for finished statuses
    next_attempt: float | None
    reply: Reply | None
    #: whether this counts as a delivery attempt (False for "destination suspended" deferrals)
    attempted: bool = True
    #: the host that answered, for logs and the DSN's Remote-MTA (None: not reported)
    relay: str | None = None
    #: the next hop took over NOTIFY=SUCCESS (it advertised DSN): SUCCESS is dropped from the
    #: stored NOTIFY, so no "relayed" notice duplicates its "delivered" one (RFC 3461 §4.1)
    notify_passed: bool = False


@dataclass(frozen=True, slots=True)
class RecipientState:
    """A recipient as stored: for bounces (`failed`) and for listings."""

    index: int
    address: str
    original: str
    notify: tuple[str, ...]
    orcpt: tuple[str, str] | None
    status: Status
    hold: Hold
    active: bool
    attempts: int
    next_attempt: float
    last_reply: Reply | None
    last_attempt: float | None
    last_relay: str | None


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A queued message as the scheduler reads it before a delivery attempt.

    Small bodies come back as bytes (they were inline in the database); big ones as a path to the
    body file. `open()` gives a fresh stream over trace header + body either way.
    """

    queue_id: str
    envelope: Envelope
    arrival: float
    header: bytes
    #: total stored size (trace header + body), as logged and as announced with SIZE=
    size: int
    inline_body: bytes | None
    body_path: Path | None
    #: CRC-32 of the body file (None: inline, or stored before checksums)
    body_crc: int | None = None

    def open(self) -> BinaryIO:
        body_size = None if self.body_path is None else self.size - len(self.header)
        return open_stored(self.header, self.inline_body, self.body_path, body_size)


@dataclass(frozen=True, slots=True)
class FreshMessage:
    """A message just committed with its attemptable recipients already claimed (in flight),
    as `Spool.commit_claimed` hands it to the scheduler: the delivery needs no queue read.

    `recipients` are those not held at commit; a crash before their attempt is recorded makes
    them due again at the next start-up (recovery clears every claim), as for any attempt.
    """

    message: StoredMessage
    recipients: tuple[DueRecipient, ...]


@dataclass(frozen=True, slots=True)
class MessageSummary:
    """One `mailq` entry."""

    queue_id: str
    arrival: float
    size: int
    sender: str
    quarantined: bool
    recipients: tuple[RecipientState, ...]
