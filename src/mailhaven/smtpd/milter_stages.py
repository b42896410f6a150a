"""The milters' turn at each stage of an SMTP session: connect, HELO, MAIL, RCPT, end of message.

In: the session (through `MilterHost`, the few things a stage reads or answers with), its
`MilterChain` and the core's event for the stage. Out: at HELO, MAIL and RCPT either nothing
(every milter was told at once, the caller accepts the command itself) or a coroutine the
session runs with reading paused, which answers the core (`accept`, or the milter's refusal,
closing the session on 421); at end of message, the reply to send now (refused, or discarded:
250 without queueing) or the writer and envelope to queue, with the milters' edits applied.
Refusals and discards are logged in Postfix's `milter-reject`/`milter-discard` shape
(`smtpd.milters`, which also builds the macros).

Invariants: the session decides *whether* milters run (`session.milters is not None`), so a
listener without milters never enters this module per command. A refused MAIL discards the
transaction's writer; a refused or discarded message aborts its writer before the reply. The
quick path (`MilterChain.quick`) sends the stage without waiting and takes no task.

SECURITY: milters are trusted to judge and edit mail, not to be well-behaved: what they send
reaches this module as `Reply` values and verdicts already checked by `proto.milter` and
`checks.milter`, and no stage waits past the chain's timeouts. The client's values in the
macros and log lines (HELO name, addresses) are those the core has parsed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any, Protocol, cast

from mailhaven.checks.milter.chain import MilterChain
from mailhaven.checks.milter.marks import delivery_marks
from mailhaven.checks.milter.rewrite import edit_envelope, rewrite
from mailhaven.checks.milter.settings import MilterSettings
from mailhaven.proto import smtp_server_events as ev
from mailhaven.proto.envelope import Envelope
from mailhaven.proto.milter import Stage
from mailhaven.proto.replies import Reply, queued_as
from mailhaven.proto.smtp_server import ServerConnection
from mailhaven.smtpd import milters as mlt
from mailhaven.smtpd.policy import SessionFacts
from mailhaven.smtpd.profile import Writer

log = logging.getLogger("mailhaven.smtpd")

#: A stage that waits on a milter's reply: the session runs it with reading paused.
Slow = Coroutine[Any, Any, None]


class MilterHost(Protocol):
    """What the stages need from the SMTP session (`smtpd.session.SMTPSession`)."""

    @property
    def conn(self) -> ServerConnection: ...
    @property
    def facts(self) -> SessionFacts: ...
    @property
    def writer(self) -> Writer | None: ...
    @property
    def label(self) -> str: ...
    def close_with(self, reply: Reply) -> None: ...
    def discard_message(self) -> None: ...
    def log_client(self) -> None: ...


def start(
    settings: MilterSettings,
    facts: SessionFacts,
    daemon: str,
    transport: asyncio.BaseTransport | None,
) -> MilterChain | None:
    """Open the listener's milters for a new client and send CONNECT in the background; None
    when the listener has no milter endpoints."""
    if not settings.active or transport is None:
        return None
    peer = transport.get_extra_info("peername") or ("", 0)
    local = transport.get_extra_info("sockname") or ("", 0)
    port = int(peer[1]) if isinstance(peer, tuple) and len(peer) > 1 else 0
    chain = MilterChain(settings)
    macros = mlt.connect_macros(facts, settings.hostname, daemon, str(local[0]))
    chain.start(facts.client_name, facts.client_ip, port, macros)
    return chain


def helo(host: MilterHost, chain: MilterChain, event: ev.Hello) -> Slow | None:
    if chain.quick(Stage.HELO):
        chain.helo_now(event.name, mlt.helo_macros(host.facts))
        return None
    return _helo(host, chain, event)


def mail(host: MilterHost, chain: MilterChain, event: ev.MailFrom, queue_id: str) -> Slow | None:
    if chain.quick(Stage.MAIL):
        chain.mail_now(
            event.address, mlt.mail_args(event), mlt.mail_macros(host.facts, queue_id, event)
        )
        return None
    return _mail(host, chain, event, queue_id)


def rcpt(host: MilterHost, chain: MilterChain, event: ev.RcptTo) -> Slow | None:
    """On the quick path the caller logs the client and accepts, as without milters."""
    if chain.quick(Stage.RCPT):
        chain.rcpt_now(event.address, [], mlt.rcpt_macros(event))
        return None
    return _rcpt(host, chain, event)


async def end_of_message(
    host: MilterHost, chain: MilterChain, writer: Writer, envelope: Envelope, hostname: str
) -> Reply | tuple[Writer, Envelope]:
    """The milters' verdict on the whole message: a reply to send now (refused, or
    discarded: 250 without queueing), or the message and envelope to queue."""
    source = cast(mlt.EditableWriter, writer)
    verdict = await chain.end_of_message(
        source,
        source.sibling,
        {"i": writer.queue_id},
        mlt.trace_field(envelope, writer.queue_id, hostname, host.facts.tls),
    )
    to = envelope.recipients[0].address if len(envelope.recipients) == 1 else None
    if verdict.refusal is not None:
        writer.abort()
        _log(host, "reject", "END-OF-MESSAGE", mlt.detail(verdict.refusal), to, writer.queue_id)
        return verdict.refusal
    if verdict.discard:
        writer.abort()
        reason = "milter triggers DISCARD action"
        _log(host, "discard", "END-OF-MESSAGE", reason, to, writer.queue_id)
        return queued_as(writer.queue_id)
    for note in verdict.notes:
        log.info("%s: milter %s", writer.queue_id, note)
    if verdict.edited:
        envelope = edit_envelope(envelope, verdict)
        writer = cast(Writer, await rewrite(source, verdict, source.sibling))
    if marks := delivery_marks(verdict, chain.settings, writer.queue_id):
        envelope = replace(envelope, extra={**envelope.extra, **marks})
    if not envelope.recipients:
        writer.abort()
        reason = "milter removed all recipients"
        _log(host, "discard", "END-OF-MESSAGE", reason, to, writer.queue_id)
        return queued_as(writer.queue_id)
    return writer, envelope


# ------------------------------------------------------------------ the slow stages


async def _helo(host: MilterHost, chain: MilterChain, event: ev.Hello) -> None:
    refusal = await chain.helo(event.name, mlt.helo_macros(host.facts))
    if refusal is None:
        host.conn.accept()
        return
    _log(host, "reject", "HELO", refusal.one_line())
    _refused(host, refusal)


async def _mail(host: MilterHost, chain: MilterChain, event: ev.MailFrom, queue_id: str) -> None:
    refusal = await chain.mail(
        event.address, mlt.mail_args(event), mlt.mail_macros(host.facts, queue_id, event)
    )
    if refusal is None:
        host.conn.accept()
        return
    mlt.log_action(
        None, "reject", "MAIL", host.label, refusal.one_line(), sender=event.address,
        rcpt=None, extended=host.conn.extended, helo=host.facts.helo,
    )
    host.discard_message()
    _refused(host, refusal)


async def _rcpt(host: MilterHost, chain: MilterChain, event: ev.RcptTo) -> None:
    refusal = await chain.rcpt(event.address, [], mlt.rcpt_macros(event))
    if refusal is None:
        host.log_client()
        host.conn.accept()
        return
    _log(host, "reject", "RCPT", refusal.one_line(), event.address)
    _refused(host, refusal)


def _refused(host: MilterHost, reply: Reply) -> None:
    host.conn.respond(reply)
    if reply.code == 421:
        host.close_with(reply)


def _log(
    host: MilterHost,
    what: str,
    stage: str,
    reply_text: str,
    rcpt: str | None = None,
    qid: str | None = None,
) -> None:
    writer = host.writer
    mail = host.conn.mail
    mlt.log_action(
        qid or (writer.queue_id if writer is not None else None),
        what,
        stage,
        host.label,
        reply_text,
        sender=mail.address if mail else "",
        rcpt=rcpt,
        extended=host.conn.extended,
        helo=host.facts.helo,
    )
