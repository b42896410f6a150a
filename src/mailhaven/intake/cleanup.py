"""Intake: the only door into the queue (Postfix's cleanup).

In: a finished `MessageWriter` (the body as the client sent it), the `Envelope`, and the session
facts (TLS summary). Out: a queue id, once the message is durable, or a refusal `Reply`.

Steps, in order:
1. inspect the first `HEAD_SCAN_LIMIT` bytes of the body (never the whole body) for the header
   block: count `Received:` fields (loop protection, RFC 5321 §6.3: more than `MAX_HOPS` means
   the message is looping: 554 5.4.6) and find the `Message-ID:` for the log;
2. expand each envelope recipient through the injected `expand` (alias expansion lives in
   routing); each final recipient remembers its original envelope recipient, NOTIFY and ORCPT
   for DSNs; duplicates after expansion are delivered once;
3. build our `Received:` trace field (RFC 5321 §4.4, Postfix's shape) and commit header + body
   to the spool, which returns only when all of it is on stable storage. When the client's data
   has no header section (its first line is no header field), the stored header ends with the
   empty line that separates it from the body (RFC 5322 §2.1, as Postfix's cleanup does): the
   first line alone decides, so the body is never read whole; every copy (local, relayed,
   returned in a bounce) is then readable;
3b. outbound authentication through the injected `outbound` hook (`mailhaven.signing`): a
   DKIM signature for mail that originates here, SRS and an ARC set for mail forwarded
   elsewhere, added to the header before the commit;
4. (the same step) the scheduler learns of the message: the `QueueDoor` it provides
   (`scheduler.active`) hands the stored message over whole when it has room, else wakes the
   scheduler to read the queue; for a message to local mailboxes only, the door
   (`scheduler.direct`) may instead deliver every copy durably itself, and nothing is queued;
5. log `<qid>: message-id=<...>` and `<qid>: from=<...>, size=N, nrcpt=M (queue active)`.

Trust: the envelope and the HELO name come from the client. They were syntax-checked by the SMTP
core, but control characters are still replaced here before they go into a header, so a hostile
HELO can never inject header lines.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Protocol

from mailhaven import maillog
from mailhaven.proto.envelope import Envelope
from mailhaven.proto.message_bytes import header_end
from mailhaven.proto.replies import STORAGE_FULL, TOO_MANY_HOPS, Reply, queued_as
from mailhaven.spool.message_writer import MessageWriter
from mailhaven.spool.records import Hold, QueuedRecipient
from mailhaven.spool.space import is_storage_full

log = logging.getLogger("mailhaven.queue")
#: Postfix logs message-id= from cleanup; maillog.py maps this logger to that name
cleanup_log = logging.getLogger("mailhaven.intake")

#: `Envelope.extra` key: a milter quarantined the message (the value is its reason).
MILTER_HOLD = "milter_hold"
#: More Received: fields than this means a mail loop (RFC 5321 §6.3; Postfix hopcount_limit).
MAX_HOPS = 50
#: Only this much of the message start is scanned for header fields (cheap, bounded).
HEAD_SCAN_LIMIT = 64 * 1024
SOFTWARE = "mailhaven"

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: The start of a header field (RFC 5322 §2.2: printable name, then a colon; §4.5 obsolete
#: syntax allows white space before the colon, as Postfix's is_header() does).
_FIELD_START = re.compile(rb"[!-9;-~]+[ \t]*:")


class QueueDoor(Protocol):
    """Where intake commits (`scheduler.active.ActiveQueue`): the message and its recipients
    are durable when `commit` returns, and the scheduler has learnt of them (handed over
    whole when it has room, else woken to read the queue); `attemptable` False (every
    recipient held) asks nothing of the scheduler.

    A door that made final deliveries itself (`scheduler.direct`: copies already durable in
    the mailboxes) returns what logs them, run after intake's `from=` line."""

    async def commit(
        self,
        writer: MessageWriter,
        envelope: Envelope,
        recipients: Sequence[QueuedRecipient],
        header: bytes,
        *,
        attemptable: bool,
    ) -> Callable[[], None] | None: ...


class OutboundHook(Protocol):
    """Outbound authentication (`mailhaven.signing.outbound`): DKIM-sign our mail, SRS and
    ARC for forwarded mail; returns the envelope and the header to commit."""

    async def apply(
        self,
        writer: MessageWriter,
        envelope: Envelope,
        recipients: Sequence[QueuedRecipient],
        header: bytes,
    ) -> tuple[Envelope, bytes]: ...

    async def close(self) -> None:
        """Stop what it started (its signing helper process)."""


@dataclass(frozen=True, slots=True)
class Queued:
    queue_id: str
    reply: Reply


@dataclass(frozen=True, slots=True)
class Refused:
    reply: Reply


Outcome = Queued | Refused


@dataclass(frozen=True, slots=True)
class HeaderFacts:
    received_count: int
    message_id: str | None
    has_date: bool = False


def scan_header(head: bytes) -> HeaderFacts:
    """Count Received: fields and find Message-ID in the header block within `head`.

    Stops at the empty line ending the header (RFC 5322 §2.1) or at the end of `head`.
    """
    received = 0
    message_id: str | None = None
    has_date = False
    current: list[bytes] = []

    def finish(field: list[bytes]) -> None:
        nonlocal received, message_id, has_date
        if not field:
            return
        name, _, value = b"".join(field).partition(b":")
        name = name.strip().lower()
        if name == b"received":
            received += 1
        elif name == b"message-id" and message_id is None:
            message_id = value.decode("utf-8", "replace").strip()
        elif name == b"date":
            has_date = True

    for line in _header_block(head).splitlines():
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            current.append(b" " + line.strip())
            continue
        finish(current)
        current = [line]
    finish(current)
    return HeaderFacts(received, message_id, has_date)


def _header_block(head: bytes) -> bytes:
    """`head` cut after the last header line when an empty line follows it, so a big message
    does not have its whole scanned start split into lines only for the loop to stop early."""
    end = header_end(head)
    return head[: end + 1] if end >= 0 else head


def needs_separator(head: bytes) -> bool:
    """True when the data starting with `head` has no header section: it is empty, or its first
    line is not a header field. Our trace fields then need the empty line after them, or the
    body's first line would be read as a header. A data that starts with the empty line
    already has its separator."""
    if head.startswith((b"\n", b"\r\n")):
        return False
    return _FIELD_START.match(head) is None


def missing_headers(facts: HeaderFacts, *, queue_id: str, hostname: str, now: float) -> bytes:
    """Submission fix-ups (RFC 6409 §8, Postfix cleanup for local and authenticated clients):
    add `Date:` and `Message-ID:` when the author's program left them out. The body and the
    existing header fields are never touched."""
    out = []
    if not facts.has_date:
        out.append(f"Date: {format_datetime(datetime.fromtimestamp(now, UTC))}\r\n")
    if facts.message_id is None:
        stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%d%H%M%S")
        out.append(f"Message-ID: <{stamp}.{queue_id}@{hostname}>\r\n")
    return "".join(out).encode("ascii")


def _clean(text: str) -> str:
    return _CONTROL.sub("?", text)


def _address_literal(ip: str) -> str:
    """RFC 5321 §4.1.3: IPv6 literals carry the `IPv6:` tag."""
    return f"IPv6:{ip}" if ":" in ip else ip


@functools.lru_cache(maxsize=4)
def _rfc5322_date(second: int) -> str:
    """The trace date, computed once per second (formatting showed in profiles)."""
    return format_datetime(datetime.fromtimestamp(second, UTC))


def received_header(
    envelope: Envelope,
    *,
    queue_id: str,
    hostname: str,
    now: float,
    tls: str | None = None,
) -> bytes:
    """Our trace field, Postfix-shaped (RFC 5321 §4.4), folded with CRLF TAB.

    `for <rcpt>` appears only with exactly one envelope recipient: naming one of several would
    disclose the others' existence to each (Postfix does the same).
    """
    lines: list[str] = []
    if envelope.client_address or envelope.helo:
        name = _clean(envelope.client_name or "unknown")
        helo = _clean(envelope.helo or envelope.client_name or "unknown")
        ip = _clean(envelope.client_address)
        tcp_info = f"{name} [{_address_literal(ip)}]" if ip else name
        lines.append(f"Received: from {helo} ({tcp_info})")
        if tls:
            lines.append(f"\t({_clean(tls)})")
        if envelope.auth_user:
            lines.append(f"\t(Authenticated sender: {_clean(envelope.auth_user)})")
        lines.append(f"\tby {hostname} ({SOFTWARE}) with {_clean(envelope.protocol)} id {queue_id}")
    else:
        lines.append(f"Received: by {hostname} ({SOFTWARE}) id {queue_id}")
    date = _rfc5322_date(int(now))
    if len(envelope.recipients) == 1:
        lines.append(f"\tfor <{_clean(envelope.recipients[0].address)}>; {date}")
    else:
        lines[-1] += f"; {date}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")


def expand_recipients(
    envelope: Envelope,
    expand: Callable[[str], Sequence[str]],
    held: Callable[[str], bool] | None = None,
) -> list[QueuedRecipient]:
    """Final recipients in envelope order, each delivered once, with its original kept.

    `held(address)` marks recipients for part-time hosts at commit time, so holding them costs
    no second transaction (the scheduler would otherwise find them due and hold them then).
    """
    seen: set[str] = set()
    out: list[QueuedRecipient] = []
    for spec in envelope.recipients:
        for final in expand(spec.address):
            if final in seen:
                continue
            seen.add(final)
            hold = Hold.ROUTE if held is not None and held(final) else Hold.NONE
            out.append(QueuedRecipient(final, spec.address, spec.notify, spec.orcpt, hold))
    return out


class Intake:
    """Built once by the composition root; shared by every receiving session."""

    def __init__(
        self,
        queue: QueueDoor,
        *,
        hostname: str,
        expand: Callable[[str], Sequence[str]],
        held: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.time,
        outbound: OutboundHook | None = None,
    ) -> None:
        #: signing step (step 3b); replaced on reload, None: off
        self.outbound = outbound
        self._queue = queue
        self._hostname = hostname
        self._expand = expand
        self._held = held
        self._clock = clock

    async def submit(
        self, writer: MessageWriter, envelope: Envelope, *, tls: str | None = None,
        added: bytes = b"",
    ) -> Outcome:
        """Queue the message or refuse it. A refused or failed message's writer is aborted.

        `tls` is a summary for the trace header, e.g. "using TLSv1.3 with cipher X (256/256
        bits)". A full disk (the body's file or the database) is refused with `452 4.3.1`
        and one log line. Unexpected exceptions (expand failure) propagate: the session
        answers 451 4.3.0 and the client retries. `added`: header fields that go right under
        our `Received:` (the receive role's `Authentication-Results:`, CRLF-terminated).
        """
        qid = writer.queue_id
        try:
            head = writer.head(HEAD_SCAN_LIMIT)
            facts = scan_header(head)
            if facts.received_count > MAX_HOPS:
                cleanup_log.warning(
                    "%s: reject: too many hops (%d Received: headers) from=<%s>",
                    qid,
                    facts.received_count,
                    envelope.sender,
                )
                writer.abort()
                return Refused(TOO_MANY_HOPS)
            recipients = expand_recipients(envelope, self._expand, self._held)
            # -- milter quarantine: held like `postsuper -h` until an administrator releases it
            if MILTER_HOLD in envelope.extra:
                recipients = [dataclasses.replace(r, hold=r.hold | Hold.ADMIN) for r in recipients]
                cleanup_log.info("%s: milter-hold: %s", qid, envelope.extra[MILTER_HOLD])
            now = self._clock()
            header = received_header(
                envelope, queue_id=qid, hostname=self._hostname, now=now, tls=tls
            ) + added
            if envelope.auth_user is not None or envelope.protocol == "local":
                header += missing_headers(facts, queue_id=qid, hostname=self._hostname, now=now)
            if needs_separator(head):
                header += b"\r\n"
            if self.outbound is not None and recipients:  # 3b. DKIM, SRS, ARC (signing/)
                envelope, header = await self.outbound.apply(writer, envelope, recipients, header)
            if facts.message_id is not None:
                maillog.info(cleanup_log, "%s: message-id=%s", qid, facts.message_id)
            if not recipients:
                # Every recipient expanded to nothing (e.g. an alias to no one): accepted, done.
                writer.abort()
                log.info("%s: removed (no recipients after expansion)", qid)
                return Queued(qid, queued_as(qid))
            attemptable = any(r.hold is Hold.NONE for r in recipients)
            delivered = await self._queue.commit(
                writer, envelope, recipients, header, attemptable=attemptable
            )
        except Exception as exc:
            writer.abort()
            if not is_storage_full(exc):
                raise
            log.warning(
                "%s: reject: %s; from=<%s>: %s", qid, STORAGE_FULL.one_line(), envelope.sender, exc
            )
            return Refused(STORAGE_FULL)
        except BaseException:
            writer.abort()
            raise
        maillog.info(
            log,
            "%s: from=<%s>, size=%d, nrcpt=%d (queue active)",
            qid,
            envelope.sender,
            len(header) + writer.size,
            len(recipients),
        )
        if delivered is not None:  # final deliveries the door made: their lines come next
            delivered()
        return Queued(qid, queued_as(qid))
