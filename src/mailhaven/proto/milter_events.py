"""Events the sans-I/O milter core (`proto.milter`) hands to its adapter.

When `MilterConnection.next_event` has none it returns a `proto.sansio.Wait`: NEED_DATA (a reply
is owed: read from the milter) or PAUSED (nothing is owed: the caller's turn to send a command).
Every event here is a notice: `Negotiated` once, one `Verdict` per command that owed a reply, the
message edits a milter asks for at end of message (`Edit`), `Progress`, and `Failed` when the
milter broke the protocol (the connection is dead from then on).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailhaven.proto.replies import Reply

if TYPE_CHECKING:
    from mailhaven.proto.milter import Action, Stage


@dataclass(frozen=True, slots=True)
class Negotiated:
    version: int
    actions: int
    protocol: int
    #: SMFIM_* stage -> macro names the milter asked for (SMFIF_SETSYMLIST); absent: all
    macros: Mapping[int, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class Verdict:
    stage: Stage
    action: Action
    #: the milter's own reply text (SMFIR_REPLYCODE) for REJECT/TEMPFAIL, else None
    reply: Reply | None = None


@dataclass(frozen=True, slots=True)
class AddHeader:
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class InsertHeader:
    index: int
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class ChangeHeader:
    """Change the `index`-th (1-based) field called `name`; an empty value deletes it."""

    index: int
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class ReplaceBody:
    """One chunk of the new body; the chunks of one message concatenate."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ChangeFrom:
    address: str
    args: str = ""


@dataclass(frozen=True, slots=True)
class AddRecipient:
    address: str
    args: str = ""


@dataclass(frozen=True, slots=True)
class DeleteRecipient:
    address: str


@dataclass(frozen=True, slots=True)
class Quarantine:
    reason: str


@dataclass(frozen=True, slots=True)
class Progress:
    """SMFIR_PROGRESS: the milter is still working; restart the reply timeout."""


@dataclass(frozen=True, slots=True)
class Failed:
    reason: str


Edit = (
    AddHeader
    | InsertHeader
    | ChangeHeader
    | ReplaceBody
    | ChangeFrom
    | AddRecipient
    | DeleteRecipient
    | Quarantine
)
Event = Negotiated | Verdict | Edit | Progress | Failed
