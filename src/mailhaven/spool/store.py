"""The spool: the durable queue every accepted message lives in until it is delivered or bounced.

In: finished `MessageWriter`s with their envelope and final recipients (from intake only).
Out: due recipients and stored messages (to the scheduler), summaries (to `mailq`).

The promise: when `await commit(...)` returns a queue id, the envelope, the recipients, the trace
header and the body are on stable storage (SQLite WAL with `synchronous=FULL`; a big body is
fsync'd, renamed into `bodies/` and its directory fsync'd before its row commits). A crash at any
point before that leaves nothing the scheduler could deliver half-written; see `recovery.py`.

Layout under `root`: `queue.db` (+ WAL files), `tmp/` (bodies being received), `bodies/<qid>`
(bodies above the inline limit, each followed by its envelope record: `salvage.py`),
`quarantine/` (damaged entries set aside), `reserve` (space for delivery results on a full
disk: `space.py`), `damaged-<time>/` (a damaged `queue.db` moved aside at `open`).

Concurrency: all SQLite access goes through the committer (`committer.py`), which commits the
work of many concurrent callers in one transaction. The per-message jobs (insert, claim,
record, remove, load) run on the event loop in "inline" batches whose COMMIT the writer thread
makes; jobs that may touch the whole queue run on the writer thread. Every async method here
is safe to call from many tasks at once. Recipients marked in flight (`claim`) are invisible
to `due()` until their result is recorded, so the scheduler never needs an in-memory view of
the whole queue.

Crash injection: `checkpoint(name)` is called at "body_written", "body_synced", "body_linked"
(big bodies only), "before_commit" and "after_commit"; the default does nothing (the daemon
passes `faults.crash_point`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import BinaryIO, TypeVar

from mailhaven.proto.envelope import Envelope
from mailhaven.proto.replies import Reply
from mailhaven.spool import queries
from mailhaven.spool.committer import CommitStats, Committer, savepoint
from mailhaven.spool.ids import QueueIdFactory, is_queue_id
from mailhaven.spool.listing import list_queue
from mailhaven.spool.message_writer import MessageWriter, body_matches
from mailhaven.spool.records import (
    DueRecipient,
    FreshMessage,
    Hold,
    MessageSummary,
    QueuedRecipient,
    RecipientKey,
    RecipientState,
    RecipientUpdate,
    Status,
    StoredMessage,
)
from mailhaven.spool.recovery import RecoveryReport, recover
from mailhaven.spool.salvage import check, salvage, trailer
from mailhaven.spool.space import Reserve, is_storage_full, storage_refusal

log = logging.getLogger("mailhaven.spool")

T = TypeVar("T")

#: bodies up to this size are stored inside the database transaction (no extra file fsyncs)
DEFAULT_INLINE_LIMIT = 128 * 1024
#: refuse new mail when less than this would stay free (Postfix queue_minfree; config
#: `queue.minfree` overrides it)
DEFAULT_MINFREE = 64 * 1024 * 1024
#: seconds between tries to record a delivery result on a full disk (first, at most)
RECORD_RETRY = (0.05, 5.0)


def _no_checkpoint(point: str) -> None:
    return None


class Spool:
    def __init__(
        self,
        root: Path,
        *,
        inline_limit: int = DEFAULT_INLINE_LIMIT,
        clock: Callable[[], float] = time.time,
        checkpoint: Callable[[str], None] = _no_checkpoint,
        minfree: int = DEFAULT_MINFREE,
    ) -> None:
        self.root = root
        self.minfree = minfree
        self.reserve = Reserve(root / "reserve")
        self._reserve_released = False
        self.db_path = root / "queue.db"
        self.tmp_dir = root / "tmp"
        self.bodies_dir = root / "bodies"
        self.quarantine_dir = root / "quarantine"
        self.inline_limit = inline_limit
        self._clock = clock
        self._checkpoint = checkpoint
        self._new_id = QueueIdFactory(clock)
        self._committer = Committer(self.db_path, checkpoint)

    # -- life cycle ---------------------------------------------------------------------------
    def open(self) -> RecoveryReport:
        """Create the layout if needed, start the writer thread and recover (blocking; call it
        once at start-up, e.g. via `asyncio.to_thread`). Only the daemon may open a spool:
        recovery deletes bodies still being received, so a second opener would destroy them.
        (With `smtp_processes` > 1 each process opens a spool of its own: `spool.shards`.)"""
        for d in (self.root, self.tmp_dir, self.bodies_dir, self.quarantine_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        exposed = self.root.stat().st_mode & 0o007
        if exposed:
            # queued mail is private: never serve from a spool anyone on the host may read
            raise PermissionError(
                f"spool {self.root} is accessible to every user (mode "
                f"{self.root.stat().st_mode & 0o777:04o}); fix it with: chmod o-rwx {self.root}"
            )
        problem = check(self.db_path)
        if problem is not None:
            # Start anyway, in a safe mode: the damaged file is kept aside, the queue rebuilt.
            log.error("spool %s: queue.db is damaged (%s); rebuilding the queue from the spool"
                      " files (as `mailhaven queue salvage`)", self.root, problem)
            salvage(self.root, clock=self._clock())
        self._committer.start()
        self.reserve.ensure()
        report = self._committer.call(
            lambda conn: recover(conn, self.tmp_dir, self.bodies_dir, self.quarantine_dir)
        )
        log.info(
            "spool %s: %d message(s) queued, %d quarantined at start-up",
            self.root, report.messages, len(report.quarantined),
        )
        return report

    def close(self) -> None:
        """Finish queued jobs and stop the writer thread (blocking)."""
        self._committer.stop()
        stats = self._committer.stats
        if stats.jobs:  # how well group commit batched: jobs per fsync'd transaction
            log.info(
                "spool %s: %d job(s) in %d transaction(s), largest batch %d",
                self.root, stats.jobs, stats.transactions, stats.largest_batch,
            )

    @property
    def stats(self) -> CommitStats:
        return self._committer.stats

    # -- intake ---------------------------------------------------------------------------------
    def storage_refusal(self, size: int = 0) -> Reply | None:
        """`452 4.3.1` when a message of `size` bytes would leave less than `minfree` free
        (asked at MAIL FROM with SIZE= and at DATA, before the client sends the body)."""
        refusal = storage_refusal(self.root, self.minfree, size)
        if refusal is None and self._reserve_released and self.reserve.ensure():
            self._reserve_released = False  # space came back: set the reserve aside again
            log.info("spool %s: disk space is back; reserve restored", self.root)
        return refusal

    def new_message(self) -> MessageWriter:
        """A writer for one incoming body; its queue id is fixed from now on."""
        return MessageWriter(self._new_id(), self.tmp_dir, self.inline_limit)

    async def commit(
        self,
        writer: MessageWriter,
        envelope: Envelope,
        recipients: Sequence[QueuedRecipient],
        header: bytes,
    ) -> str:
        """Make the message durable; returns its queue id only once it is.

        `header` (trace fields such as Received:) is stored before the body. If this raises or
        is cancelled before returning, the message may or may not be queued but was never
        acknowledged; in the "not queued" case no file is left behind.
        """
        fresh = await self._commit(writer, envelope, recipients, header, claimed=False)
        return fresh.message.queue_id

    async def commit_claimed(
        self,
        writer: MessageWriter,
        envelope: Envelope,
        recipients: Sequence[QueuedRecipient],
        header: bytes,
    ) -> FreshMessage:
        """`commit`, with the recipients not held stored as already in flight (claimed), and
        the message handed back as the scheduler will deliver it (Postfix's cleanup passing a
        new message straight to qmgr's active queue). The caller must pass the result to the
        scheduler (`Runner.offer`): no `due()` will return these recipients until their attempt
        is recorded, they are unclaimed, or the spool is opened again."""
        return await self._commit(writer, envelope, recipients, header, claimed=True)

    async def _commit(
        self,
        writer: MessageWriter,
        envelope: Envelope,
        recipients: Sequence[QueuedRecipient],
        header: bytes,
        *,
        claimed: bool,
    ) -> FreshMessage:
        if not recipients:
            raise ValueError(f"{writer.queue_id}: no recipients")
        qid = writer.queue_id
        arrival = self._clock()
        if writer.arrival is not None:  # picked up from the maildrop: it arrived there
            arrival = min(arrival, writer.arrival)
        size = len(header) + writer.size
        body: bytes | None = None
        target: Path | None = None
        if not writer.spilled:
            body = writer.take_inline()
            await self._committer.run(
                lambda c: queries.insert_message(
                    c, qid, arrival, envelope, header, body, size, recipients, claimed=claimed
                ),
                atomic=True,
                inline=True,
            )
        else:
            target = self.bodies_dir / qid
            await self._commit_spilled(
                writer,
                target,
                lambda: trailer(
                    arrival=arrival, envelope=envelope,
                    recipients=recipients, header=header, size=size, body_crc=writer.crc,
                ),
                lambda c: queries.insert_message(
                    c, qid, arrival, envelope, header, None, size, recipients, claimed=claimed,
                    body_crc=writer.crc,
                ),
            )
        crc = writer.crc if target is not None else None
        message = StoredMessage(qid, envelope, arrival, header, size, body, target, crc)
        if not claimed:
            return FreshMessage(message, ())
        due = tuple(
            DueRecipient(qid, i, r.address, r.original, 0, arrival, arrival)
            for i, r in enumerate(recipients)
            if not r.hold
        )
        return FreshMessage(message, due)

    async def _commit_spilled(
        self,
        writer: MessageWriter,
        target: Path,
        trailer: Callable[[], bytes],
        insert: Callable[[sqlite3.Connection], None],
    ) -> None:
        """A big body: the file, with its envelope record after the body (for `salvage`),
        fsync'd and renamed into `bodies/` first, then its row."""

        def seal() -> None:
            writer.append_trailer(trailer())
            writer.seal_to(target, self._checkpoint)

        try:
            await asyncio.to_thread(seal)
        except BaseException:
            writer.abort()
            target.unlink(missing_ok=True)
            raise
        fut = self._committer.submit(insert, atomic=True)
        try:
            await asyncio.wrap_future(fut)
        except BaseException:
            # Not acknowledged. Keep the file only if the row may have committed.
            if fut.cancelled() or (fut.done() and fut.exception() is not None):
                target.unlink(missing_ok=True)
            raise

    # -- delivery -----------------------------------------------------------------------------
    async def load(self, queue_id: str) -> StoredMessage | None:
        """The stored message (None if it was removed or is quarantined); its body is not read."""
        return await self._committer.run(
            lambda c: queries.load_message(c, queue_id, self.bodies_dir), write=False, inline=True
        )

    async def load_to_send(self, queue_id: str) -> StoredMessage | None:
        """`load`, for a delivery attempt: a body file that no longer matches its checksum is
        quarantined (held and logged) and None returned, so a damaged message is never sent.
        Only here is the body read for the check: once per attempt, not at every lookup."""
        msg = await self.load(queue_id)
        if msg is None or msg.body_path is None or msg.body_crc is None:
            return msg
        body_size = msg.size - len(msg.header)
        try:
            intact = await asyncio.to_thread(body_matches, msg.body_path, body_size, msg.body_crc)
            problem = "body file does not match its checksum"
        except OSError as exc:
            intact, problem = False, f"body unreadable: {exc.strerror or exc}"
        if intact:
            return msg
        log.warning("%s: quarantined: %s; recipients held", queue_id, problem)
        await self._committer.run(lambda c: queries.quarantine(c, queue_id), inline=True)
        if is_queue_id(queue_id):
            with contextlib.suppress(OSError):
                os.rename(msg.body_path, self.quarantine_dir / queue_id)
        return None

    async def open_body(self, queue_id: str) -> BinaryIO:
        """A fresh stream over trace header + body; KeyError if there is no such message."""
        msg = await self.load(queue_id)
        if msg is None:
            raise KeyError(queue_id)
        return msg.open()

    async def size(self, queue_id: str) -> int | None:
        msg = await self.load(queue_id)
        return None if msg is None else msg.size

    async def count(self) -> int:
        """How many messages the queue holds (for status reports; one indexed count)."""
        return await self._committer.run(
            lambda c: int(c.execute("SELECT count(*) FROM message").fetchone()[0]), write=False
        )

    async def counts(self) -> dict[str, int]:
        """Messages, and unfinished recipients by state, for `mailhaven status`: in flight
        (active), never tried (incoming), waiting to retry (deferred), held."""
        return await self._committer.run(queries.queue_counts, write=False)

    # -- scheduler ------------------------------------------------------------------------------
    async def due(self, now: float, limit: int) -> list[DueRecipient]:
        """Attemptable recipients with `next_attempt <= now`: up to `limit` never-tried ones
        followed by up to `limit` deferred ones, each oldest first (fairness is the plan's)."""
        return await self._committer.run(lambda c: queries.select_due(c, now, limit), write=False)

    async def next_due_time(self) -> float | None:
        """When the earliest attemptable recipient falls due (None: nothing to attempt)."""
        return await self._committer.run(queries.next_due, write=False)

    async def claim(self, keys: Sequence[RecipientKey]) -> list[RecipientKey]:
        """Mark recipients as in flight (hidden from `due()` until `record`/`unclaim`); returns
        those claimed (a recipient held, finished or deleted meanwhile is left out)."""
        return await self._committer.run(lambda c: queries.claim(c, keys), inline=True)

    async def unclaim(self, keys: Sequence[RecipientKey]) -> None:
        await self._committer.run(lambda c: queries.set_active(c, keys, False), inline=True)

    async def hold_recipients(self, keys: Sequence[RecipientKey], reason: Hold) -> None:
        await self._committer.run(lambda c: queries.add_hold(c, keys, reason), inline=True)

    async def record(self, queue_id: str, updates: Sequence[RecipientUpdate]) -> int:
        """Durably store attempt results; returns the message's unfinished recipient count."""
        now = self._clock()
        return await self._until_recorded(
            queue_id,
            lambda: self._committer.run(
                lambda c: queries.apply_updates(c, queue_id, updates, now), inline=True
            ),
        )

    async def _until_recorded(self, queue_id: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run `attempt` (a delivery result's write) until it succeeds on a full disk.

        A result that is not stored means the message is delivered again after a restart, so
        it must not need new space: the first "disk full" releases the reserve and retries at
        once; after that it keeps retrying (with back-off) until space returns. Other errors
        are raised."""
        delay = RECORD_RETRY[0]
        while True:
            try:
                result = await attempt()
            except Exception as exc:
                if not is_storage_full(exc):
                    raise
                if self.reserve.release():
                    self._reserve_released = True
                    continue
                if delay == RECORD_RETRY[0]:
                    log.warning("%s: disk full: cannot record the delivery result yet; retrying",
                                queue_id)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECORD_RETRY[1])
                continue
            if delay != RECORD_RETRY[0]:
                log.info("%s: delivery result recorded after the disk had been full", queue_id)
            return result

    async def record_and_finish(
        self, queue_id: str, updates: Sequence[RecipientUpdate]
    ) -> tuple[int, bool]:
        """`record`, and in the same transaction remove the message if nothing is left to do
        and nobody is owed a report (the common case: every recipient delivered). Returns
        (unfinished recipients, removed). One commit instead of record + load + remove."""
        now = self._clock()

        def job(c: sqlite3.Connection) -> tuple[int, bool | None]:
            if updates and all(u.status is Status.SENT for u in updates):
                # one statement: deletes the message, or changes nothing
                body_file = queries.delete_if_delivered(c, queue_id, [u.index for u in updates])
                if body_file is not None:
                    return 0, body_file
            with savepoint(c):
                remaining = queries.apply_updates(c, queue_id, updates, now)
                quiet = queries.remove_if_quiet(c, queue_id) if remaining == 0 else None
            return remaining, quiet

        remaining, body_file = await self._until_recorded(
            queue_id, lambda: self._committer.run(job, atomic=True, inline=True)
        )
        if body_file and is_queue_id(queue_id):
            (self.bodies_dir / queue_id).unlink(missing_ok=True)  # after the commit, as remove()
        return remaining, body_file is not None

    async def mark_warned(self, queue_id: str) -> bool:
        """Claim the single delay warning of a message: True only for the first caller."""
        return await self._committer.run(lambda c: queries.mark_warned(c, queue_id), inline=True)

    async def recipients(self, queue_id: str) -> list[RecipientState]:
        return await self._committer.run(
            lambda c: queries.select_recipients(c, queue_id), write=False, inline=True
        )

    async def finished(self) -> list[str]:
        """Queue ids with nothing left to do (removal was interrupted by a crash)."""
        return await self._committer.run(queries.finished_messages, write=False)

    async def remove(self, queue_id: str) -> bool:
        """Delete a message and its body (done, bounced or deleted). False if absent."""
        body_file = await self._committer.run(
            lambda c: queries.delete_message(c, queue_id), atomic=True, inline=True
        )
        if body_file and is_queue_id(queue_id):
            # After the commit: a crash here leaves an orphan file that recovery deletes.
            (self.bodies_dir / queue_id).unlink(missing_ok=True)
        return body_file is not None

    # -- administration (postsuper / postqueue) -------------------------------------------------
    async def hold(self, queue_id: str) -> int:
        """Hold a message's unfinished recipients (like `postsuper -h`)."""
        now = self._clock()
        return await self._committer.run(
            lambda c: queries.change_hold(c, queue_id, Hold.ADMIN, True, now)
        )

    async def release(self, queue_id: str) -> int:
        """Undo `hold` (`postsuper -H`); recipients already due become due at once."""
        now = self._clock()
        return await self._committer.run(
            lambda c: queries.change_hold(c, queue_id, Hold.ADMIN, False, now)
        )

    async def delete(self, queue_id: str) -> bool:
        """Drop a message without a bounce (`postsuper -d`)."""
        removed = await self.remove(queue_id)
        if removed:
            log.info("%s: removed (deleted by administrator)", queue_id)
        return removed

    async def requeue(self, queue_id: str | None = None) -> int:
        """Make one message (or, with None, every deferred recipient) due now (`postqueue -f`,
        `postqueue -i`). Wake the scheduler afterwards."""
        now = self._clock()
        return await self._committer.run(lambda c: queries.requeue(c, queue_id, now))

    async def release_domain(self, domain: str) -> int:
        """Clear the route hold of a domain's recipients and make them due now (ETRN)."""
        now = self._clock()
        return await self._committer.run(lambda c: queries.release_domain(c, domain, now))

    async def list_messages(self) -> list[MessageSummary]:
        """The whole queue for an in-daemon `mailq` (the CLI calls `list_queue(root)`)."""
        return await asyncio.to_thread(lambda: list(list_queue(self.root)))

    def quarantined_body(self, queue_id: str) -> Path | None:
        path = self.quarantine_dir / queue_id
        return path if is_queue_id(queue_id) and os.path.exists(path) else None
