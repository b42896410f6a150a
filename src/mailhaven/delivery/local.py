"""The local delivery agent: final delivery of a message into a user's Maildir (Postfix local(8)).

In: a `DeliveryRequest` whose `route` is `Route("local", user)` and whose recipients are the
final addresses (after alias expansion) that map to that user. Out: one `Reply` per recipient:

* `250 2.0.0` once the copy is fsync'd in `new/` (the scheduler then forgets the recipient, so
  250 must mean durable; see `mailbox.maildir`).
* `550 5.1.1` when the user is not (or no longer) a valid, known mailbox.
* `554 5.4.6` when the message already carries `Delivered-To: <this recipient>`: it has been
  here before, so delivering again would feed a forwarding loop (Postfix local(8) does the same).
* `452 4.2.2` when the user's Maildir++ quota (`mailbox.quota`) has no room for the message, or
  the file system's quota says EDQUOT: a deferral, never a bounce; the scheduler bounces only
  once the message outlives the queue lifetime (Dovecot's `quota_full_tempfail = yes`).
* `452 4.3.1` (disk full) or `451 4.3.0` (any other I/O error, or anything
  unexpected): try again later. Nothing is ever half-delivered.

The copy goes to the INBOX or to a Maildir++ folder (`mailbox.folders`: the junk folder for
spam the checks flagged, `.ext` for `user+ext@` when that folder exists); quota counts the
whole Maildir, folders included, and the `maildirsize` delta is appended once the copy is
durable.

Each recipient gets its own copy, because each copy starts with its own trace lines
(RFC 5321 §4.4): `Return-Path: <sender>` and `Delivered-To: <recipient>`. The message is
streamed from `request.open_message()`, never held in memory whole; a message that is in memory
already (an `io.BytesIO`: the spool's inline bodies) is converted and written in one go. All
file I/O for a request happens in one worker thread (`asyncio.to_thread`), off the event loop.

Trust: the user name comes from routing; `mailbox_path` re-checks it before it becomes a path.
Sender and recipient are stripped of control characters before they go into a header line.
An existing Return-Path header in the message is not removed here (that is intake's job).
"""

from __future__ import annotations

import asyncio
import errno
import io
import logging
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from mailhaven.delivery.base import DeliveryRequest, DeliveryResult
from mailhaven.mailbox import folders, quota
from mailhaven.mailbox.maildir import UniqueNames, deliver, ensure_maildir, mailbox_path, parse_name
from mailhaven.mailbox.owner import MailOwner
from mailhaven.proto.message_bytes import header_end
from mailhaven.proto.replies import DELIVERED, Reply

log = logging.getLogger(__name__)

#: Read size from the spool stream.
READ_CHUNK = 64 * 1024
#: Stop looking for Delivered-To after this much header (a bounded cost; Postfix also only
#: looks at the header).
HEADER_SCAN_LIMIT = 1024 * 1024


class ForwardingLoop(Exception):
    """The message already has a Delivered-To line for this recipient."""


class LocalAgent:
    """`DeliveryAgent` for transport "local": Maildir under `<mail_root>/<domain>/<user>/`,
    files owned as `owner` says (`mailbox.owner`; None: the process's own, 0600).

    `users`, when given, is the current set of local users; a recipient whose user is not in it
    has vanished since RCPT time and gets 550 5.1.1. Without it any valid name is delivered to
    (the directory is created on first delivery). It is called on the event loop thread.
    """

    def __init__(
        self,
        mail_root: Path,
        hostname: str,
        *,
        users: Callable[[], Collection[str]] | None = None,
        names: UniqueNames | None = None,
        owner: MailOwner | None = None,
        quotas: Callable[[], quota.QuotaRules] | None = None,
        folder_rules: Callable[[], folders.FolderRules] | None = None,
    ) -> None:
        self._root = mail_root
        self._owner = owner
        self._users = users
        self._names = names or UniqueNames(hostname)
        #: callables, so a reload's new rules apply to the next delivery
        self._quotas = quotas
        self._folders = folder_rules

    async def deliver(self, request: DeliveryRequest) -> DeliveryResult:
        known = self._users() if self._users is not None else None
        replies = await asyncio.to_thread(self.deliver_blocking, request, known)
        return DeliveryResult(replies, "local")

    def deliver_blocking(
        self, request: DeliveryRequest, known: Collection[str] | None = None
    ) -> dict[str, Reply]:
        """The whole group, synchronously (what `deliver` runs in a worker thread)."""
        return {
            rcpt: self._deliver_one(request, rcpt, known)
            for rcpt in dict.fromkeys(request.recipients)
        }

    def _deliver_one(
        self, request: DeliveryRequest, rcpt: str, known: Collection[str] | None
    ) -> Reply:
        user = request.route.nexthop
        try:
            maildir = mailbox_path(self._root, user)
        except ValueError:
            return _no_such_user(rcpt)
        if known is not None and user not in known:
            return _no_such_user(rcpt)
        prepend = trace_lines(request.envelope.sender, rcpt)
        limit = (
            self._quotas().limit_for(user, rcpt.rpartition("@")[2] or None)
            if self._quotas is not None
            else quota.Limit()
        )
        try:
            target = maildir
            if self._folders is not None:
                target = folders.choose(maildir, rcpt, request.envelope.extra, self._folders())
            if not limit.unlimited:
                ensure_maildir(maildir, self._owner)
                used = quota.usage(maildir, limit, self._owner)
                if not used.fits(limit, request.size + len(prepend)):
                    log.info(
                        "%s: mailbox %s over quota: %d bytes, %d messages used; limit %s",
                        request.queue_id, user, used.bytes, used.messages, limit.header(),
                    )
                    return mailbox_full(rcpt)
            folders.prepare_folder(maildir, target, self._owner)
            with request.open_message() as stream:
                message: bytes | Iterator[bytes]
                if isinstance(stream, io.BytesIO):  # in memory already: one conversion, one write
                    message = stream.getvalue()
                    check_loop(message, rcpt)
                else:
                    message = refuse_loops(_read_chunks(stream), rcpt)
                stored = deliver(
                    target,
                    message,
                    prepend=prepend,
                    names=self._names,
                    owner=self._owner,
                    no_bare_cr=request.no_bare_cr,
                )
            if not limit.unlimited:
                _count(maildir, limit, stored, request.queue_id, self._owner)
        except ForwardingLoop:
            return Reply(554, f"mail forwarding loop for {_clean(rcpt)}", "5.4.6")
        except OSError as exc:
            result = io_failure(exc)
            log.warning(
                "%s: to=<%s>, relay=local, maildir %s: %s",
                request.queue_id,
                _clean(rcpt),
                maildir,
                exc,
            )
            return result
        except Exception:
            log.exception(
                "%s: to=<%s>, relay=local, unexpected error", request.queue_id, _clean(rcpt)
            )
            return Reply(451, "temporary failure in local delivery", "4.3.0")
        return DELIVERED


def mailbox_full(rcpt: str) -> Reply:
    """Over quota: temporary (RFC 3463 X.2.2), as Dovecot with quota_full_tempfail."""
    return Reply(452, f"<{_clean(rcpt)}>: mailbox full (quota exceeded), try again later", "4.2.2")


def _count(
    maildir: Path, limit: quota.Limit, stored: Path, queue_id: str, owner: MailOwner | None
) -> None:
    """Add the stored copy to maildirsize. The copy is already durable and acknowledged, so a
    failure here is only logged: the next recalculation counts the file anyway."""
    size = parse_name(stored.name)[1]
    try:
        quota.update(
            maildir, limit, size if size is not None else stored.stat().st_size, 1, owner
        )
    except OSError as exc:
        log.warning("%s: cannot update %s: %s", queue_id, maildir / quota.FILE_NAME, exc)


def trace_lines(sender: str, recipient: str) -> bytes:
    """`Return-Path:` and `Delivered-To:` for one copy (RFC 5321 §4.4; null sender is `<>`)."""
    text = f"Return-Path: <{_clean(sender)}>\nDelivered-To: {_clean(recipient)}\n"
    return text.encode("utf-8")


def io_failure(exc: OSError) -> Reply:
    """A temporary reply for a failed write, as precise as RFC 3463 allows."""
    if exc.errno == errno.EDQUOT:
        return Reply(452, "mailbox full", "4.2.2")
    if exc.errno == errno.ENOSPC:
        return Reply(452, "insufficient system storage", "4.3.1")
    return Reply(451, f"temporary failure writing maildir: {exc.strerror or exc}", "4.3.0")


def check_loop(message: bytes, recipient: str) -> None:
    """`refuse_loops` for a message held whole: raise `ForwardingLoop` if its header (at most
    HEADER_SCAN_LIMIT bytes of it) has a Delivered-To line naming `recipient`."""
    end = header_end(message, 0, HEADER_SCAN_LIMIT + 3)  # no copy, no scan past the header
    header = message[:end] if end >= 0 else message[:HEADER_SCAN_LIMIT]
    if _names_recipient(header, recipient.strip().lower().encode("utf-8")):
        raise ForwardingLoop(recipient)


def refuse_loops(chunks: Iterable[bytes], recipient: str) -> Iterator[bytes]:
    """Pass `chunks` through, raising `ForwardingLoop` if the header already names `recipient`
    in a Delivered-To line (case-insensitive). The Maildir writer removes its tmp file when the
    stream raises, so a refused copy leaves nothing behind."""
    needle = recipient.strip().lower().encode("utf-8")
    head = bytearray()
    scanning = True
    for chunk in chunks:
        if scanning:
            start = max(0, len(head) - 3)
            head += chunk
            end = header_end(head, start)
            if end >= 0 or len(head) > HEADER_SCAN_LIMIT:
                scanning = False
                if _names_recipient(bytes(head[:end] if end >= 0 else head), needle):
                    raise ForwardingLoop(recipient)
                head = bytearray()
        yield chunk
    if scanning and _names_recipient(bytes(head), needle):
        raise ForwardingLoop(recipient)


def _names_recipient(header: bytes, needle: bytes) -> bool:
    for line in header.split(b"\n"):
        name, colon, value = line.partition(b":")
        if (
            colon
            and name.strip().lower() == b"delivered-to"
            and value.strip().strip(b"<>").lower() == needle
        ):
            return True
    return False


def _read_chunks(stream: BinaryIO) -> Iterator[bytes]:
    while chunk := stream.read(READ_CHUNK):
        yield chunk


def _clean(text: str) -> str:
    """No CR, LF or other control characters may reach a header line or a log line."""
    return "".join(ch for ch in text if ch.isprintable())


def _no_such_user(rcpt: str) -> Reply:
    return Reply(550, f"<{_clean(rcpt)}>: user unknown (no such mailbox)", "5.1.1")
