"""End of DATA on the MX port: mail authentication of the finished message (`checks.inbound`).

In: the session facts, the envelope and the spool writer holding the message as received. Out:
a `GateResult`: a refusal `Reply` (the writer is then aborted), or the header fields intake adds
under its `Received:` and the writer to commit, which is a fresh copy under the same queue id
when forged `Authentication-Results:` fields claiming our authserv-id had to be removed.

Logs, keyed by queue id: `<qid>: auth: spf=... dkim=... dmarc=... arc=...` for every checked
message, and for a refusal Postfix's milter-reject shape, `<qid>: milter-reject:
END-OF-MESSAGE from <client>: <reply>; from=<...> to=<...> proto=ESMTP helo=<...>`, so
`grep QID` tells the story and pflogsumm counts the rejection.

The message is read back from the writer once (in a thread when it spilled to disk); above
`max_verify_size` only its header block is read (it is not verified). An
unexpected error in the checks is logged with its traceback and the message is accepted without
our header: a bug here must not refuse mail (fail open, as Postfix's milter_default_action
accept). SECURITY: only unauthenticated clients outside the trusted networks get here
(`InboundChecks.applies`), and nothing from the message reaches the log unescaped beyond the
summary the checks build from parsed values.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from mailhaven import maillog
from mailhaven.checks.authresults import strip_fields
from mailhaven.checks.inbound import HEADER_LIMIT, InboundChecks
from mailhaven.proto.envelope import Envelope
from mailhaven.proto.replies import Reply
from mailhaven.smtpd.policy import SessionFacts

log = logging.getLogger("mailhaven.smtpd")

#: Copy chunk when a message is rewritten without its forged fields.
_COPY_CHUNK = 1024 * 1024


class StoredWriter(Protocol):
    """The spool writer as the gate reads it (`spool.message_writer.MessageWriter`)."""

    no_bare_cr: bool

    @property
    def queue_id(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def spilled(self) -> bool: ...

    def head(self, limit: int) -> bytes: ...

    def write(self, data: bytes) -> None: ...

    def abort(self) -> None: ...


@dataclass(frozen=True, slots=True)
class GateResult:
    reply: Reply | None
    header: bytes
    writer: StoredWriter
    #: DMARC p=quarantine failed: deliver into the recipient's Junk folder
    spam: bool = False


class InboundGate:
    """Built per MX profile from the configuration; shared by that profile's sessions."""

    def __init__(
        self, checks: InboundChecks, fresh_writer: Callable[[str], StoredWriter]
    ) -> None:
        self.checks = checks
        self._fresh = fresh_writer

    async def run(
        self, facts: SessionFacts, envelope: Envelope, writer: StoredWriter, label: str
    ) -> GateResult:
        recipients = [r.address for r in envelope.recipients]
        if not self.checks.applies(facts.client_ip, facts.auth_user is not None, recipients):
            return GateResult(None, b"", writer)
        try:
            return await self._run(facts, envelope, writer, label, recipients)
        except Exception:
            log.exception("%s: mail authentication failed; accepted unchecked", writer.queue_id)
            return GateResult(None, b"", writer)

    async def _run(
        self, facts: SessionFacts, envelope: Envelope, writer: StoredWriter, label: str,
        recipients: list[str],
    ) -> GateResult:  # fmt: skip
        qid = writer.queue_id
        whole = writer.size <= self.checks.settings.max_verify_size
        message = await self._read(writer, writer.size if whole else HEADER_LIMIT)
        verdict = await self.checks.check(
            message, client_ip=facts.client_ip, helo=facts.helo, mail_from=envelope.sender,
            recipients=recipients, size=writer.size,
        )  # fmt: skip
        maillog.info(log, "%s: auth: %s", qid, verdict.summary)
        if verdict.reply is not None:
            log.info(
                "%s: milter-reject: END-OF-MESSAGE from %s: %s; from=<%s> to=<%s> proto=%s "
                "helo=<%s>", qid, label, verdict.reply.one_line(), envelope.sender,
                recipients[0] if recipients else "", "ESMTP", facts.helo,
            )  # fmt: skip
            writer.abort()
            return GateResult(verdict.reply, b"", writer)
        if verdict.forged:
            log.info("%s: removed %d forged Authentication-Results field(s)", qid,
                     len(verdict.forged))  # fmt: skip
            if not whole:
                message = await self._read(writer, writer.size)
            writer = await self._rewrite(writer, strip_fields(message, verdict.forged))
        return GateResult(None, verdict.header, writer, verdict.quarantine)

    @staticmethod
    async def _read(writer: StoredWriter, limit: int) -> bytes:
        """The message's first `limit` octets (from disk in a thread, when it spilled)."""
        if writer.spilled:
            return await asyncio.to_thread(writer.head, limit)
        return writer.head(limit)

    async def _rewrite(self, old: StoredWriter, data: bytes) -> StoredWriter:
        """The message again, as `data`, in a fresh writer with the same queue id."""
        new = self._fresh(old.queue_id)
        old.abort()

        def copy() -> None:
            for start in range(0, len(data), _COPY_CHUNK):
                new.write(data[start : start + _COPY_CHUNK])

        if len(data) > _COPY_CHUNK:
            await asyncio.to_thread(copy)
        else:
            copy()
        return new
