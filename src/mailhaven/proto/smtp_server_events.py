"""Events the sans-I/O SMTP (and LMTP) server core hands to the application.

Two kinds:
- *decisions* (`Hello`, `MailFrom`, `RcptTo`, `BodyEnd`, `LmtpBodyEnd`, `Verify`, `Expand`,
  `Etrn`, `AuthStart`, `AuthResponse`): the core stops reading until the application answers
  through `ServerConnection.accept()` / `.respond()` (or the AUTH calls). Policy lives here.
- *notices* (`BodyData`, `BodyAborted`, `Reset`, `StartTLS`, `Answered`, `Closed`): the core has
  already answered; the application only acts (store the chunk, discard the message, start TLS,
  count the command, close).
"""

from __future__ import annotations

from dataclasses import dataclass

from mailhaven.proto.address import MailParams, RcptParams
from mailhaven.proto.replies import Reply


@dataclass(frozen=True, slots=True)
class Hello:
    """HELO (extended=False), EHLO or LMTP's LHLO (extended=True). Accept sends the greeting."""

    name: str
    extended: bool


@dataclass(frozen=True, slots=True)
class MailFrom:
    address: str
    params: MailParams


@dataclass(frozen=True, slots=True)
class RcptTo:
    address: str
    params: RcptParams


@dataclass(frozen=True, slots=True)
class BodyData:
    """Decoded message content (dot-unstuffed), in arrival order. Store it; no answer."""

    data: bytes


@dataclass(frozen=True, slots=True)
class BodyEnd:
    """The whole body arrived intact: answer with the queueing result (250 only once durable)."""

    size: int


@dataclass(frozen=True, slots=True)
class LmtpBodyEnd:
    """LMTP (RFC 2033 §4.2): the whole body arrived intact; answer once per recipient, in the
    order of `recipients`, by calling `respond()` that many times (each reply leaves at once)."""

    size: int
    recipients: tuple[RcptTo, ...]


@dataclass(frozen=True, slots=True)
class BodyAborted:
    """The core rejected the body (size, bare newline, ...) and has answered: discard it."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class Reset:
    """The transaction ended without a message (RSET, HELO/EHLO, error): discard any state."""


@dataclass(frozen=True, slots=True)
class Verify:
    argument: str


@dataclass(frozen=True, slots=True)
class Expand:
    argument: str


@dataclass(frozen=True, slots=True)
class Etrn:
    """RFC 1985: `argument` is `domain`, `@domain` or `#queue`."""

    argument: str


@dataclass(frozen=True, slots=True)
class StartTLS:
    """The core answered 220 and dropped buffered input: do the handshake, then
    call `tls_established()`."""


@dataclass(frozen=True, slots=True)
class AuthStart:
    """AUTH mechanism [initial-response]; `initial` is None when absent, "" for `=`."""

    mechanism: str
    initial: str | None


@dataclass(frozen=True, slots=True)
class AuthResponse:
    """One client line during an AUTH exchange (base64 text, or `*` to cancel)."""

    line: str


@dataclass(frozen=True, slots=True)
class Answered:
    """The core answered a command: `command` is its verb in lower case ("unknown" when not
    recognised), for the adapter's Postfix-style statistics (`ehlo=1 mail=1 rcpt=0/1 ...`).
    DATA and BDAT count once, with the reply to the end of the message (for LMTP, the last
    recipient's); an AUTH exchange counts once, with its final reply."""

    command: str
    reply: Reply


@dataclass(frozen=True, slots=True)
class Closed:
    """The session is over (QUIT, error budget, protocol violation, or EOF): flush and close."""

    reason: str


Event = (
    Hello
    | MailFrom
    | RcptTo
    | BodyData
    | BodyEnd
    | LmtpBodyEnd
    | BodyAborted
    | Reset
    | Verify
    | Expand
    | Etrn
    | StartTLS
    | AuthStart
    | AuthResponse
    | Answered
    | Closed
)

#: The events that wait for the application's answer (see the module docstring).
Decision = (
    Hello
    | MailFrom
    | RcptTo
    | BodyEnd
    | LmtpBodyEnd
    | Verify
    | Expand
    | Etrn
    | AuthStart
    | AuthResponse
)
