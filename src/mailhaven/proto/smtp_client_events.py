"""Events the sans-I/O SMTP (and LMTP) client core hands to its adapter.

When `ClientConnection.next_event` has none it returns a `proto.sansio.Wait`: NEED_DATA (a reply
is awaited: read from the peer) or PAUSED (the caller's turn: see `phase`). Every event here is a
notice; the caller acts on it through the connection's methods (`start`, `send_body`,
`tls_started`, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailhaven.proto.replies import Reply

if TYPE_CHECKING:
    from mailhaven.proto.smtp_client import Capabilities, Phase


@dataclass(frozen=True, slots=True)
class StartTLS:
    """The peer said 220 to STARTTLS: handshake now, then call tls_started() or tls_failed()."""


@dataclass(frozen=True, slots=True)
class Ready:
    """The session can carry a transaction: call start() or quit()."""

    capabilities: Capabilities


@dataclass(frozen=True, slots=True)
class SendBody:
    """The peer said 354: call send_body() for each chunk, then end_body()."""


@dataclass(frozen=True, slots=True)
class TransactionDone:
    """One reply per (distinct) recipient of the transaction (for LMTP, each accepted
    recipient's own reply to the end of the message)."""

    results: Mapping[str, Reply]


@dataclass(frozen=True, slots=True)
class SessionFailed:
    """The session never became ready, or broke outside a transaction; try another host."""

    reply: Reply
    phase: Phase


@dataclass(frozen=True, slots=True)
class Closed:
    """Nothing more will happen: close the transport."""


Event = StartTLS | Ready | SendBody | TransactionDone | SessionFailed | Closed
