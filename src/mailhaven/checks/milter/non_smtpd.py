"""Milters for locally submitted mail (`sendmail`, the pickup): Postfix's non_smtpd_milters.

In: a message the pickup read from the maildrop and its envelope, on their way to intake (this
wraps the pickup's `Door`). Out: the same `Outcome` intake gives, after `[checks.milter]
non_smtpd` saw the message: queued (maybe edited, marked as spam or held), or refused.

There is no SMTP session, so the milters are shown one made up the way Postfix does for
non-SMTP mail: CONNECT from `localhost [127.0.0.1]`, HELO `localhost`, then MAIL, each RCPT
and the message, with the queue id (`i`) and `{daemon_name}` = "pickup". A signer such as
OpenDKIM then treats the mail as internal (127.0.0.1 is in its InternalHosts) and signs it.

What the milters say (each message is its own session; nothing is kept between messages):
- refused with 5xx (at any stage, one recipient included: a drop file is queued whole or not
  at all): `Refused(5xx)`: the pickup moves the drop file aside to `maildrop/corrupt/`
  (logged), where the administrator finds it; nothing is queued.
- 4xx, or a milter down with `default_action = "tempfail"`: `Refused(4xx)`: the drop file
  stays and the pickup tries again later.
- discard, or every recipient deleted: the message is dropped (`milter-discard` logged) and
  reported as done, so the drop file is removed.
- edits, quarantine and spam verdicts: as for SMTP mail (`rewrite`, `marks`).

SECURITY: the drop file is an unprivileged local user's; the milters judge it like any mail.
The made-up client is fixed text, never taken from the drop file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol, cast

from mailhaven.checks.milter.chain import MilterChain
from mailhaven.checks.milter.marks import delivery_marks
from mailhaven.checks.milter.rewrite import EditableWriter, edit_envelope, rewrite
from mailhaven.checks.milter.settings import MilterSettings
from mailhaven.intake.cleanup import Outcome, Queued, Refused
from mailhaven.pickup.collector import BodyWriter, Door
from mailhaven.proto.envelope import Envelope
from mailhaven.proto.replies import Reply, discarded_as

log = logging.getLogger("mailhaven.milter")

#: Postfix shows non-SMTP mail to milters as coming from here.
LOCAL_NAME = "localhost"
LOCAL_ADDRESS = "127.0.0.1"
DAEMON_NAME = "pickup"


class SpoolWriter(EditableWriter, Protocol):
    """The spool's writer as the chain needs it (the pickup's `BodyWriter` is a narrower view
    of the same object)."""

    @property
    def size(self) -> int: ...
    def sibling(self) -> SpoolWriter: ...


class MilteredDoor:
    """A pickup `Door` that shows each message to the non_smtpd milters before intake.
    `settings` is asked per message (a reload changes the list)."""

    def __init__(self, door: Door, settings: Callable[[], MilterSettings | None]) -> None:
        self._door = door
        self._settings = settings

    def new_message(self) -> BodyWriter:
        return self._door.new_message()

    async def submit(self, writer: BodyWriter, envelope: Envelope) -> Outcome:
        settings = self._settings()
        if settings is None or not settings.active:
            return await self._door.submit(writer, envelope)
        source = cast(SpoolWriter, writer)
        chain = MilterChain(settings)
        try:
            result = await _ask(chain, source, envelope)
        except BaseException:
            source.abort()  # the pickup logs the error and tries the drop file again
            raise
        finally:
            chain.close()
        if isinstance(result, Reply):
            source.abort()
            return Refused(result) if result.code >= 400 else Queued(source.queue_id, result)
        edited, envelope = result
        return await self._door.submit(cast(BodyWriter, edited), envelope)


async def _ask(
    chain: MilterChain, source: SpoolWriter, envelope: Envelope
) -> Reply | tuple[SpoolWriter, Envelope]:
    """The milters' answer: a reply (refused, or discarded: 250), or the message to queue."""
    qid = source.queue_id
    hostname = chain.settings.hostname
    chain.start(LOCAL_NAME, LOCAL_ADDRESS, 0, {
        "j": hostname, "{daemon_name}": DAEMON_NAME, "v": "mailhaven",
        "_": f"{LOCAL_NAME} [{LOCAL_ADDRESS}]",
        "{client_addr}": LOCAL_ADDRESS, "{client_name}": LOCAL_NAME,
    })
    sender = envelope.sender
    refusal = await chain.helo(LOCAL_NAME, {}) or await chain.mail(
        sender, [], {"i": qid, "{mail_addr}": sender, "{mail_host}": sender.rpartition("@")[2]}
    )
    if refusal is not None:
        return _refused(qid, "MAIL", refusal, envelope)
    for rcpt in envelope.recipients:
        address = rcpt.address
        refusal = await chain.rcpt(
            address, [], {"{rcpt_addr}": address, "{rcpt_host}": address.rpartition("@")[2]}
        )
        if refusal is not None:
            chain.abort()
            return _refused(qid, "RCPT", refusal, envelope, address)
    verdict = await chain.end_of_message(source, source.sibling, {"i": qid})
    if verdict.refusal is not None:
        return _refused(qid, "END-OF-MESSAGE", verdict.refusal, envelope)
    for note in verdict.notes:
        log.info("%s: milter %s", qid, note)
    if verdict.discard:
        log.info("%s: milter-discard: END-OF-MESSAGE from local: milter triggers DISCARD "
                 "action; from=<%s>", qid, sender)
        return discarded_as(qid)
    if verdict.edited:
        envelope = edit_envelope(envelope, verdict)
        source = cast(SpoolWriter, await rewrite(source, verdict, source.sibling))
    if marks := delivery_marks(verdict, chain.settings, qid):
        envelope = replace(envelope, extra={**envelope.extra, **marks})
    if not envelope.recipients:
        source.abort()
        log.info("%s: milter-discard: END-OF-MESSAGE from local: milter removed all "
                 "recipients; from=<%s>", qid, sender)
        return discarded_as(qid)
    return source, envelope


def _refused(
    qid: str, stage: str, reply: Reply, envelope: Envelope, rcpt: str | None = None
) -> Reply:
    """A refusal for the pickup, logged in Postfix's milter-reject shape. One refused
    recipient refuses the whole message: a drop file is queued whole or not at all."""
    to = rcpt or (envelope.recipients[0].address if len(envelope.recipients) == 1 else "")
    log.info("%s: milter-reject: %s from local: %s; from=<%s> to=<%s>",
             qid, stage, reply.one_line(), envelope.sender, to)
    return reply
