"""Final delivery at commit time: a message for local mailboxes only goes straight into them.

Role: the door intake commits through (`intake.cleanup.QueueDoor`), in front of the active
queue. When every final recipient of a message is a plain local mailbox, each copy is written
into its Maildir *before* the SMTP reply, like an LMTP server's final delivery, and the message
never enters the spool: one durable write per copy instead of a queue commit, the copy and the
queue's update. Anything else is committed to the spool as before (`ActiveQueue.commit`).

In: the finished `MessageWriter`, the envelope, the final recipients (after alias expansion),
the trace header. Out: returns once every recipient is either delivered durably or queued
durably; a failure to queue raises, as a plain commit would (the session answers 451/452).

Who goes direct (all of the message's recipients, or none of them):
* the route is the local transport (`Route("local", user)`): not relay, LMTP or hold (ETRN);
* the recipient is not held (a milter quarantine, a part-time host);
* it did not ask for a success notice (NOTIFY=SUCCESS): the DSN is built from the queue;
* `enabled()` says so (`[mailbox] delivery = "direct"`, read per message so a reload applies).

Per recipient: the copy is made by the local agent's own code (`LocalAgent.deliver_blocking`:
trace lines, folders, quota, loop refusal), on this door's own few threads (`DELIVERY_THREADS`),
so it is byte for byte what the queued path would deliver. A recipient whose copy failed (quota, I/O, unknown
mailbox, a loop) is committed to the spool with the message, as if it had just arrived: the
scheduler tries it again and defers or bounces it with its usual semantics.

Logs: the same lines as the queued path, in the same order: intake's `from=` line, then
`to=<...>, relay=local, ..., status=sent (delivered to maildir)` per copy, then `removed` when
nothing was queued (returned by `commit` as a report for intake to run after its own line).

Invariants: intake answers 250 only after `commit` returned, so only after every copy is
durable (file and `new/` fsync'd) or queued. If queuing the failed part fails, the client gets
a 4xx and the copies already made stay (at-least-once: its retry delivers them again, as a
crash between a Maildir commit and the queue update does). A cancelled commit (shutdown) lets
the copies in progress finish and logs them.

Trust: as the local agent's (user names re-checked before they become paths).
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import BinaryIO

from mailhaven import maillog
from mailhaven.delivery.base import DeliveryRequest
from mailhaven.delivery.local import LocalAgent
from mailhaven.proto.envelope import Envelope
from mailhaven.proto.message_bytes import BARE_CR
from mailhaven.proto.replies import Reply
from mailhaven.routing.route import Route
from mailhaven.runtime.job_threads import JobThreads
from mailhaven.scheduler.active import ActiveQueue
from mailhaven.scheduler.outcome import Verdict, attempt_line
from mailhaven.spool.message_writer import MessageWriter, prefixed
from mailhaven.spool.records import (
    DueRecipient,
    Hold,
    QueuedRecipient,
    RecipientUpdate,
    Status,
)

log = logging.getLogger("mailhaven.queue")

#: the relay name of the local transport in delivery lines (as the queued path logs it)
RELAY = "local"
#: Threads that make the copies: a pool of their own (`runtime.job_threads`: a cheap hand-over),
#: so a burst of deliveries does not wait behind the default executor's other work. Each copy
#: is mostly two fsyncs, and concurrent fsyncs share journal commits, so a few threads, not
#: one; each also takes the GIL back after every system call, so not many.
DELIVERY_THREADS = 4

Report = Callable[[], None]


class DirectDoor:
    """`QueueDoor`: direct final delivery for all-local messages, the spool for the rest."""

    def __init__(
        self,
        queue: ActiveQueue,
        agent: LocalAgent,
        route: Callable[[str], Route],
        *,
        enabled: Callable[[], bool],
        users: Callable[[], Collection[str]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._queue = queue
        self._agent = agent
        self._route = route
        self._enabled = enabled
        self._users = users
        self._clock = clock
        self._threads = JobThreads("maildir", DELIVERY_THREADS)  # started on first use

    async def commit(
        self,
        writer: MessageWriter,
        envelope: Envelope,
        recipients: Sequence[QueuedRecipient],
        header: bytes,
        *,
        attemptable: bool,
    ) -> Report | None:
        routes = self.direct_routes(recipients) if writer.error is None else None
        if routes is None:
            await self._queue.commit(writer, envelope, recipients, header, attemptable=attemptable)
            return None
        qid = writer.queue_id
        started = self._clock()
        arrival = writer.arrival if writer.arrival is not None else started
        try:
            known = self._users() if self._users is not None else None
            source = _Source(header, writer.read_back())
        except Exception:  # the users file, the body's file: the queue may still take it
            log.exception("%s: direct delivery not possible, queued", qid)
            await self._queue.commit(writer, envelope, recipients, header, attemptable=attemptable)
            return None
        clean = writer.no_bare_cr and BARE_CR.search(header) is None
        requests = [
            DeliveryRequest(
                qid, envelope, tuple(group), route, source.open, len(header) + writer.size, clean
            )
            for route, group in _by_route(recipients, routes).items()
        ]
        future = self._threads.submit(self._deliver_all, requests, known, source)
        try:
            replies = await asyncio.shield(future)
        except asyncio.CancelledError:
            # The worker thread cannot be stopped: let it finish, and say what it delivered.
            def finished(f: asyncio.Future[dict[str, Reply]]) -> None:
                if not f.cancelled() and f.exception() is None:
                    self._lines(qid, recipients, f.result(), arrival, started, unacked=True)()

            future.add_done_callback(finished)
            raise
        failed = [r for r in recipients if not replies[r.address].is_success]
        if not failed:
            writer.abort()
            return self._lines(qid, recipients, replies, arrival, started)
        for r in failed:
            log.info(  # not a `to=` line: the queued attempt that follows logs that
                "%s: direct delivery for <%s> failed, queued: %s",
                qid, r.address, replies[r.address].one_line(),
            )
        report = self._lines(qid, recipients, replies, arrival, started, queued=True)
        try:
            await self._queue.commit(writer, envelope, failed, header, attemptable=True)
        except BaseException:
            report()  # the copies made are facts, whatever the client is told now
            log.warning(
                "%s: queuing the failed recipients failed after %d direct delivery(ies):"
                " the client's retry duplicates them", qid, len(recipients) - len(failed),
            )
            raise
        return report

    def direct_routes(self, recipients: Sequence[QueuedRecipient]) -> dict[str, Route] | None:
        """Each recipient's local route, or None when any of them must take the queue."""
        if not recipients or not self._enabled():
            return None
        routes: dict[str, Route] = {}
        for r in recipients:
            if r.hold is not Hold.NONE or any(n.upper() == "SUCCESS" for n in r.notify):
                return None
            try:
                route = self._route(r.address)
            except Exception:  # the scheduler logs and defers it: its problem, not ours
                return None
            if route.transport != "local":
                return None
            routes[r.address] = route
        return routes

    def _deliver_all(
        self,
        requests: Sequence[DeliveryRequest],
        known: Collection[str] | None,
        source: _Source,
    ) -> dict[str, Reply]:
        """Every copy, in one worker thread (blocking); unknown errors are temporary."""
        replies: dict[str, Reply] = {}
        try:
            for request in requests:
                try:
                    replies.update(self._agent.deliver_blocking(request, known))
                except Exception:
                    log.exception("%s: direct delivery to %s failed", request.queue_id,
                                  request.route.nexthop)
        finally:
            source.close()
        for request in requests:
            for rcpt in request.recipients:
                replies.setdefault(rcpt, TEMPORARY)
        return replies

    def _lines(
        self,
        qid: str,
        recipients: Sequence[QueuedRecipient],
        replies: Mapping[str, Reply],
        arrival: float,
        started: float,
        *,
        queued: bool = False,
        unacked: bool = False,
    ) -> Report:
        """The delivery lines of the copies made (run after intake's `from=` line)."""
        now = self._clock()
        delays = (started - arrival, 0.0, 0.0, now - started)

        def report() -> None:
            sent = 0
            for index, r in enumerate(recipients):
                reply = replies[r.address]
                if not reply.is_success:
                    continue
                sent += 1
                due = DueRecipient(qid, index, r.address, r.original, 0, arrival, arrival)
                update = RecipientUpdate(index, Status.SENT, None, reply, True, RELAY)
                verdict = Verdict(due, reply, "sent", update)
                maillog.info(
                    log, attempt_line(qid, verdict, relay=RELAY, now=now, delays=delays)
                )
            if unacked and sent:
                log.warning("%s: %d copy(ies) delivered but not acknowledged (session ended)",
                            qid, sent)
            elif not queued:
                maillog.info(log, "%s: removed", qid)

        return report


#: a copy whose attempt raised instead of answering (the agent catches what it expects)
TEMPORARY = Reply(451, "temporary failure in local delivery", "4.3.0")


def _by_route(
    recipients: Sequence[QueuedRecipient], routes: Mapping[str, Route]
) -> dict[Route, list[str]]:
    groups: dict[Route, list[str]] = {}
    for r in recipients:
        groups.setdefault(routes[r.address], []).append(r.address)
    return groups


class _Source:
    """The message as the spool would store it: trace header, then the body the writer holds
    (in memory, or its file); `open()` gives a fresh stream per copy (one thread at a time).
    A body in memory is joined to the header once, and each copy gets an `io.BytesIO` over
    those same bytes (the agent converts and writes it in one go)."""

    def __init__(self, header: bytes, body: BinaryIO) -> None:
        self._header = header
        self._body = body
        self._whole = header + body.getvalue() if isinstance(body, io.BytesIO) else None

    def open(self) -> BinaryIO:
        if self._whole is not None:
            return io.BytesIO(self._whole)
        return prefixed(self._header, self._body)

    def close(self) -> None:
        self._body.close()
