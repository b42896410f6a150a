"""What a listener is made of, and the narrow interfaces an SMTP session talks through.

Role: the seam between the composition root (`app.listeners`, `app.engine`) and the session
adapter (`smtpd.session`). `ListenerProfile` says what differs between the MX, submission,
submissions and LMTP listeners; the protocols name the only operations a session may call on
the queue (`MessageSink`), on final delivery (`LocalStore`) and on SASL (`Authenticator`), so
the app can wire other implementations (tests, LMTP) without the session knowing.

Imports: protocol types and the checks' settings only; nothing here does I/O.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from mailhaven.checks.gate import Gate
from mailhaven.checks.milter.settings import MilterSettings
from mailhaven.proto.envelope import Envelope
from mailhaven.proto.replies import Reply
from mailhaven.proto.smtp_server import ServerSettings
from mailhaven.smtpd.inbound_gate import InboundGate
from mailhaven.smtpd.policy import SessionFacts, SMTPPolicy


class Writer(Protocol):
    """The spool's streaming writer for one incoming body."""

    #: set once the SMTP framing accepted the whole body (it refuses bare CRs)
    no_bare_cr: bool

    @property
    def queue_id(self) -> str: ...

    def write(self, data: bytes) -> None: ...

    def abort(self) -> None: ...


class MessageSink(Protocol):
    """The door into the queue (intake): durable before `accept` returns a 250."""

    def new_message(self) -> Writer: ...

    async def accept(
        self, writer: Writer, envelope: Envelope, tls: str | None, added: bytes = b""
    ) -> Reply: ...


class Authenticator(Protocol):
    """Runs one SASL exchange: `start` and `step` return a challenge (str) or a final result."""

    def start(self, facts: SessionFacts, mechanism: str, initial: str | None) -> AuthStep: ...


class AuthStep(Protocol):
    async def respond(self, line: str | None) -> str | tuple[Reply, str | None]: ...


@dataclass(frozen=True)
class ListenerProfile:
    """Everything that differs between the MX, submission and submissions listeners."""

    name: str
    settings: ServerSettings
    policy: SMTPPolicy
    tls_context: Callable[[], ssl.SSLContext | None]
    etrn: Callable[[SessionFacts, str], Awaitable[Reply]] | None = None
    authenticator: Authenticator | None = None
    #: the abuse checks (`checks.gate`): access lists, DNS lists, greylisting, sender limits
    gate: Gate | None = None
    #: content scanners and signers for this listener (`milters`/`submission_milters`)
    milters: MilterSettings | None = None
    #: LMTP listener (`settings.lmtp`): the store that delivers each message at once and answers
    #: per recipient (`smtpd.lmtp_store`), instead of the queue
    store: LocalStore | None = None
    #: mail authentication at end of DATA (the MX port: `smtpd.inbound_gate`)
    inbound: InboundGate | None = None


class LocalStore(Protocol):
    """Final delivery for the LMTP listener: a writer per message, one reply per recipient."""

    def new_message(self) -> Writer: ...

    async def deliver(self, writer: Writer, envelope: Envelope) -> list[Reply]: ...
