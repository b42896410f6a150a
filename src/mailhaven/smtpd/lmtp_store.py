"""The LMTP listener's store: final delivery into local Maildirs, one verdict per recipient.

Other MTAs (Postfix's `lmtp`, Exim's `lmtp` transport, another mailhaven) hand mail for our
mailboxes to `[listen] lmtp`; the session drives the server core in LMTP mode (RFC 2033) and asks
this module, at the end of data, for one reply per accepted recipient. Unlike SMTP there is no
queue in between: LMTP's contract is that the client keeps the message until we say where each
copy went, so each reply is the result of the delivery itself (Dovecot's LMTP works the same).

In: the body chunks as they arrive (`new_message()` gives a writer; the body goes to a temporary
file in the state directory, never whole into memory), then the envelope. Out: a `Reply` per
envelope recipient, in order: 250 once the copy is fsync'd in the Maildir, the local agent's 4xx
(quota 452 4.2.2, disk) or 5xx (no such mailbox, loop) otherwise. A recipient that expands to
several mailboxes (an alias) gets 250 only when every copy is stored, else the first temporary
failure (the client retries; copies already stored may then arrive twice, the at-least-once
promise of the queue too), else the first permanent one.

What is welcome (`LmtpPolicy`): only recipients that routing accepts and that expand to local
Maildirs here. Mail that would have to be relayed on, or handed to another LMTP store, is
refused at RCPT with 550 5.1.1: a store that quietly queued and forwarded would break the
per-recipient promise above, and a sender MTA has its own queue for that.

Trace: each copy starts with the local agent's `Return-Path:` and `Delivered-To:`, then our
`Received:` field (with LMTP as the protocol), as a queued message would.

SECURITY: the listener has no authentication (RFC 2033 §1: LMTP is for a trusted local
network). Bind it to loopback or a unix-domain-socket-like private address; it never relays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import BinaryIO

from mailhaven import maillog
from mailhaven.delivery.base import DeliveryRequest
from mailhaven.delivery.local import LocalAgent
from mailhaven.intake.cleanup import received_header
from mailhaven.proto import smtp_server_events as ev
from mailhaven.proto.envelope import Envelope
from mailhaven.proto.replies import DELIVERED, Reply, not_a_mailbox
from mailhaven.routing.route import Route
from mailhaven.routing.router import Router
from mailhaven.smtpd.policy import PolicySettings, SessionFacts, SMTPPolicy
from mailhaven.smtpd.profile import Writer
from mailhaven.spool.ids import QueueIdFactory
from mailhaven.spool.message_writer import prefixed

log = logging.getLogger("mailhaven.lmtp")

#: Bodies up to this size stay in memory; larger ones go to a temporary file.
SPOOL_IN_MEMORY = 1024 * 1024


def not_here(address: str) -> Reply:
    return not_a_mailbox(address)


class LmtpPolicy(SMTPPolicy):
    """RCPT: what routing accepts, and only when every final address is a local Maildir."""

    def rcpt_to(self, facts: SessionFacts, event: ev.RcptTo) -> Reply | None:
        refusal = super().rcpt_to(facts, event)
        if refusal is not None:
            return refusal
        router = self._router()
        finals = router.expand(event.address)
        if not finals or any(router.route(f).transport != "local" for f in finals):
            return not_here(event.address)
        return None


def lmtp_policy(router: Callable[[], Router], **kwargs: object) -> LmtpPolicy:
    """The listener's policy: no AUTH, no VRFY/EXPN answers, the quota check if given."""
    return LmtpPolicy(router, PolicySettings(), **kwargs)  # type: ignore[arg-type]


class BodyFile:
    """The session's writer for one LMTP message: a spooled temporary file."""

    def __init__(self, queue_id: str, directory: Path | None) -> None:
        self.queue_id = queue_id
        # closed by abort(), which the session or `deliver` always calls
        self.file: BinaryIO = tempfile.SpooledTemporaryFile(  # type: ignore[assignment]  # noqa: SIM115
            max_size=SPOOL_IN_MEMORY, dir=str(directory) if directory else None, prefix="lmtp-"
        )
        self.size = 0
        self.no_bare_cr = False  # (the writer protocol's; LMTP stores convert as they always did)

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.size += len(data)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()


class LmtpStore:
    """Delivers each LMTP message straight into the local Maildirs (see the module doc)."""

    def __init__(
        self,
        router: Callable[[], Router],
        agent: LocalAgent,
        *,
        hostname: str,
        spool_dir: Path | None = None,
        ids: QueueIdFactory | None = None,
        clock: Callable[[], float] = time.time,
        mailboxes: Callable[[], Collection[str]] | None = None,
    ) -> None:
        self._router = router
        #: the current mailbox names (as the local agent checks them in the queue's path)
        self._mailboxes = mailboxes
        self._agent = agent
        self._hostname = hostname
        self._dir = spool_dir
        self._ids = ids or QueueIdFactory()
        self._clock = clock

    def new_message(self) -> BodyFile:
        if self._dir is not None:
            os.makedirs(self._dir, mode=0o700, exist_ok=True)
        return BodyFile(self._ids(), self._dir)

    async def deliver(self, writer: Writer, envelope: Envelope) -> list[Reply]:
        """One reply per envelope recipient, in order; the writer is closed afterwards."""
        assert isinstance(writer, BodyFile)
        known = self._mailboxes() if self._mailboxes is not None else None
        started = time.monotonic()
        try:
            replies = await asyncio.to_thread(self._deliver_blocking, writer, envelope, known)
        finally:
            writer.abort()
        took = time.monotonic() - started
        for spec, answer in zip(envelope.recipients, replies, strict=True):
            maillog.info(log, "%s", delivery_line(writer.queue_id, spec.address, answer, took))
        return replies

    def _deliver_blocking(
        self, writer: BodyFile, envelope: Envelope, known: Collection[str] | None
    ) -> list[Reply]:
        router = self._router()
        trace = received_header(
            envelope, queue_id=writer.queue_id, hostname=self._hostname, now=self._clock()
        )
        body = writer.file

        def open_message() -> BinaryIO:
            return prefixed(trace, body)

        replies = []
        for spec in envelope.recipients:
            verdicts = []
            for final in router.expand(spec.address):
                route = router.route(final)
                if route.transport != "local":
                    verdicts.append(not_here(final))
                    continue
                request = DeliveryRequest(
                    writer.queue_id, envelope, (final,), Route("local", route.nexthop),
                    open_message, writer.size + len(trace),
                )
                verdicts.extend(self._agent.deliver_blocking(request, known).values())
            replies.append(combine(spec.address, verdicts))
        return replies


def delivery_line(queue_id: str, address: str, answer: Reply, seconds: float) -> str:
    """Postfix's delivery line shape (what pflogsumm and `grep status=` expect), relay=local:
    `QID: to=<a>, relay=local, delay=0.01, delays=0/0/0/0.01, dsn=2.0.0, status=sent (...)`."""
    status = "sent" if answer.is_success else "deferred" if answer.is_temporary else "bounced"
    took = f"{seconds:.2f}"
    shown = "".join(ch if ch.isprintable() else "?" for ch in address)
    return (
        f"{queue_id}: to=<{shown}>, relay=local, delay={took}, delays=0/0/0/{took},"
        f" dsn={answer.dsn}, status={status} ({answer.one_line()})"
    )


def combine(address: str, verdicts: list[Reply]) -> Reply:
    """All copies stored: 250; else the first temporary failure; else the first permanent."""
    if not verdicts:
        return not_here(address)
    for verdict in verdicts:
        if verdict.is_temporary:
            return verdict
    for verdict in verdicts:
        if verdict.is_permanent:
            return verdict
    return DELIVERED
