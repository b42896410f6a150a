"""Group commit: one SQLite connection commits many callers' work at once.

Why: with `synchronous=FULL` every COMMIT costs a WAL fsync, so commits one by one are capped
by the disk's fsync latency. Callers hand their work over as jobs; the jobs gathered while the
previous COMMIT was in flight run in ONE transaction (each inside its own SAVEPOINT so one
failing job cannot spoil the others), which commits once, and only then is each caller's
future resolved. Throughput grows with concurrency instead of being capped by fsync latency.
Where the jobs run: per-message jobs on the event loop (inline batches, below), the rest on
the writer thread, which also makes every COMMIT.

A job is a function of the connection. Its result (or exception) reaches the caller only after
the COMMIT has returned, so a caller that sees success knows its writes are durable. If the
COMMIT itself fails, every job of the batch fails. Read-only jobs skip the transaction.

A job that is atomic by itself (`atomic=True`: one statement, or one that undoes its own
partial work when it fails, with `savepoint` or otherwise) runs without the SAVEPOINT/RELEASE
pair, which would otherwise be most of the statements of a relayed message's two jobs.

Inline batches (`run(..., inline=True)`, the per-message jobs of intake, delivery and the
scheduler): the jobs run on the event loop thread itself, inside a transaction opened there,
and only the COMMIT (the fsync) is handed to the writer thread. Why: the sqlite3 module gives up
the GIL around every statement, so the writer thread had to take it back from the busy event
loop after each one; inline, the writer thread wakes once per batch for the COMMIT and the loop
never waits for the disk. The loop does not COMMIT by itself: it would stand still during each
fsync. (The measurements behind these choices: docs/benchmarks.md, "Design measurements".)
Ownership of the connection passes between the two threads explicitly (`_IDLE`, `_LOOP`, `_WRITER`); it is
never used by both at once. Jobs that may scan the whole queue (listing, requeue, due scans)
stay on the writer thread.

If the writer thread fails for good (a COMMIT failed and so did its ROLLBACK: the disk is
gone), every job in flight, queued or still to come fails at once with `SpoolUnavailable`, so
each caller answers (a session: 451) instead of waiting forever; the thread stays as a sink
that fails what arrives until `stop()`. A restart opens the spool afresh.

Crash injection: `checkpoint(name)` is called at "before_commit" (all jobs ran, nothing durable)
and "after_commit" (durable, nobody told yet); tests make it raise or `os._exit`.

Trust: jobs are the spool's own code; nothing from the network reaches SQL except as bound
parameters.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mailhaven.spool.schema import connect

log = logging.getLogger("mailhaven.spool")

T = TypeVar("T")
Job = Callable[[sqlite3.Connection], T]

#: at most this many jobs share one transaction (bounds the latency of the first one)
MAX_BATCH = 1024
#: Seconds a write batch of the writer thread waits, once, for one more job when the queue ran
#: empty (PostgreSQL's commit_delay): fewer, fuller transactions, each costing an fsync. Inline
#: batches never wait (it measured no gain there: docs/benchmarks.md).
LINGER = 0.001


#: who may use the connection (see the module docstring): nobody, the event loop (running an
#: inline batch), or the writer thread (running a batch, or committing the loop's)
_IDLE, _LOOP, _WRITER = "idle", "loop", "writer"


@dataclass(slots=True)
class CommitStats:
    """Counters for tests and benchmarks: jobs run and write transactions committed."""

    jobs: int = 0
    transactions: int = 0
    largest_batch: int = 0


@dataclass(frozen=True, slots=True)
class _Item:
    fn: Callable[[sqlite3.Connection], Any]
    #: a thread-side future (`submit`, `call`) or an event loop's future (`run`)
    future: concurrent.futures.Future[Any] | asyncio.Future[Any]
    write: bool
    loop: asyncio.AbstractEventLoop | None = None
    #: the job is atomic by itself: no savepoint around it
    atomic: bool = False

    def start(self) -> bool:
        """False if the caller gave up before the job ran (it is then skipped)."""
        if isinstance(self.future, concurrent.futures.Future):
            return self.future.set_running_or_notify_cancel()
        return not self.future.cancelled()  # settled for good on the loop, see _settle


def _settle(outcomes: list[tuple[_Item, bool, Any]]) -> None:
    """Resolve a batch's event-loop futures (runs on their loop; a cancelled one is skipped)."""
    for item, ok, value in outcomes:
        if item.future.done():
            continue
        if ok:
            item.future.set_result(value)
        else:
            item.future.set_exception(value)


@dataclass(frozen=True, slots=True)
class _Commit:
    """An inline batch whose jobs ran on the loop, for the writer thread to COMMIT."""

    outcomes: list[tuple[_Item, bool, Any]]
    loop: asyncio.AbstractEventLoop


class SpoolUnavailable(OSError):
    """The writer thread has failed; no job runs until the spool is opened again."""


_STOP = object()
#: tells the writer thread the loop gave the connection back (it has deferred work)
_WAKE = object()


@contextlib.contextmanager
def savepoint(conn: sqlite3.Connection) -> Iterator[None]:
    """Inside an `atomic` job: make the statements of this block one unit (all or none)."""
    conn.execute("SAVEPOINT part")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK TO part")
        conn.execute("RELEASE part")
        raise
    conn.execute("RELEASE part")


class Committer:
    """The writer thread. `start()` opens the database inside the thread; `stop()` drains it."""

    def __init__(self, path: Path, checkpoint: Callable[[str], None]) -> None:
        self._path = path
        self._checkpoint = checkpoint
        self._queue: queue.SimpleQueue[_Item | _Commit | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._conn: sqlite3.Connection | None = None
        self.stats = CommitStats()
        # connection ownership (guarded by _mutex) and who waits for it
        self._mutex = threading.Lock()
        self._owner = _IDLE
        self._loop_waiting = False
        self._writer_waiting = False
        # the inline batch being gathered (touched on its event loop only)
        self._inline: list[_Item] = []
        self._inline_loop: asyncio.AbstractEventLoop | None = None
        self._flush_scheduled = False
        #: what made the writer thread fail for good (None while it works)
        self._dead: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="spool-writer", daemon=True)
        self._thread.start()
        self._ready.result()  # re-raises an open error in the caller

    def stop(self) -> None:
        if self._thread is None:
            return
        # inline jobs not started yet run on the writer thread, before it stops
        pending, self._inline = self._inline, []
        for item in pending:
            self._queue.put(item)
        self._queue.put(_STOP)
        self._thread.join()
        self._thread = None

    def submit(
        self, fn: Job[T], *, write: bool = True, atomic: bool = False
    ) -> concurrent.futures.Future[T]:
        """Queue a job from any thread; the future resolves after its batch commits."""
        if self._thread is None:
            raise RuntimeError("spool is not open")
        if self._dead is not None:
            raise self._unavailable()
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put(_Item(fn, fut, write, atomic=atomic))
        return fut

    async def run(
        self, fn: Job[T], *, write: bool = True, atomic: bool = False, inline: bool = False
    ) -> T:
        """`submit` for coroutines. A batch's results reach their event loop in ONE
        `call_soon_threadsafe` (one wake-up of the loop per commit, not one per job).

        `inline`: a short job (a few statements on indexed keys), run on this event loop with
        the other inline jobs of this loop turn (see the module docstring)."""
        if self._thread is None:
            raise RuntimeError("spool is not open")
        if self._dead is not None:
            raise self._unavailable()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        item = _Item(fn, fut, write, loop, atomic)
        if inline and self._adopt(loop):
            self._inline.append(item)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                loop.call_soon(self._flush)
        else:
            self._queue.put(item)
        return await fut

    def call(self, fn: Job[T], *, write: bool = True) -> T:
        """`submit` for synchronous callers (start-up, CLI); blocks until committed."""
        return self.submit(fn, write=write).result()

    # -- inline batches, on the event loop ------------------------------------------------------
    def _adopt(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Inline batches belong to one event loop at a time (another one's jobs go to the
        writer thread); a loop that has nothing gathered can hand over (tests run several)."""
        if self._inline_loop is not loop:
            if self._inline or self._flush_scheduled:
                return False
            self._inline_loop = loop
        return True

    def _flush(self) -> None:
        """Run the gathered inline jobs in one transaction and hand its COMMIT over."""
        self._flush_scheduled = False
        if not self._inline:
            return
        if self._dead is not None:
            failed, self._inline = self._inline, []
            _settle([(item, False, self._unavailable()) for item in failed])
            return
        with self._mutex:
            if self._owner is not _IDLE:
                self._loop_waiting = True  # the writer calls us again when it is done
                return
            self._owner = _LOOP
        batch, self._inline = [item for item in self._inline if item.start()], []
        conn = self._conn
        assert conn is not None and self._inline_loop is not None
        writes = any(item.write for item in batch)
        if not writes:
            outcomes = [self._run_job(conn, item, in_txn=False) for item in batch]
            self._loop_release()
            self._count(len(outcomes), committed=False)
            _settle(outcomes)
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
            outcomes = [self._run_job(conn, item, in_txn=True) for item in batch]
        except BaseException as exc:
            log.error("spool: batch of %d failed: %r", len(batch), exc)
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            finally:
                self._loop_release()  # even then: a connection never given back stalls all
            _settle([(item, False, exc) for item in batch])
            if not isinstance(exc, Exception):
                raise
            return
        with self._mutex:
            self._owner = _WRITER  # from here the connection is the writer thread's
        self._queue.put(_Commit(outcomes, self._inline_loop))

    def _count(self, jobs: int, *, committed: bool = True) -> None:
        """Update the stats (both threads do: under the mutex)."""
        with self._mutex:
            self.stats.jobs += jobs
            if committed:
                self.stats.transactions += 1
                self.stats.largest_batch = max(self.stats.largest_batch, jobs)

    def _loop_release(self) -> None:
        with self._mutex:
            self._owner = _IDLE
            wake, self._writer_waiting = self._writer_waiting, False
        if wake:
            self._queue.put(_WAKE)

    def _after_commit(self, outcomes: list[tuple[_Item, bool, Any]], flush: bool) -> None:
        _settle(outcomes)
        if flush:
            self._flush()

    # -- the thread --------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            conn = connect(self._path, any_thread=True)
        except BaseException as exc:
            self._ready.set_exception(exc)
            return
        self._conn = conn
        self._ready.set_result(None)
        deferred: list[_Item] = []  # jobs that came while the loop held the connection
        batch: list[_Item] = []
        try:
            while True:
                special: object = None
                if deferred:
                    if self._writer_take():
                        batch, deferred = deferred, []
                        self._run_batch(conn, batch)
                        self._writer_release()
                        continue
                    item = self._queue.get()  # the loop hands back: a _Commit or _WAKE
                    if isinstance(item, _Item):
                        deferred.append(item)
                        continue
                    special = item
                else:
                    batch, special = self._gather()
                    if batch:
                        if self._writer_take():
                            self._run_batch(conn, batch)
                            self._writer_release()
                        else:
                            deferred = batch
                if isinstance(special, _Commit):
                    self._commit_inline(conn, special)
                elif special is _STOP:
                    if deferred:  # the loop has stopped: nobody holds the connection now
                        self._run_batch(conn, deferred)
                    return
        except BaseException as exc:
            self._fail_for_good(conn, exc, batch + deferred)
        finally:
            conn.close()

    def _unavailable(self) -> SpoolUnavailable:
        """A fresh exception for one caller (one instance raised again and again would pile
        up every raiser's traceback)."""
        fresh = SpoolUnavailable(f"the spool's writer failed: {self._dead!r}")
        fresh.__cause__ = self._dead
        return fresh

    def _fail_for_good(self, conn: sqlite3.Connection, exc: BaseException, held: list[_Item]) -> None:
        """The writer thread cannot go on: fail every job it holds and all that come, until
        `stop()` (see the module docstring)."""
        log.error("spool: writer thread failed, queue unavailable until restart: %r", exc)
        self._dead = exc
        with contextlib.suppress(Exception):
            if conn.in_transaction:
                conn.rollback()
        self._resolve([(item, False, self._unavailable()) for item in held])
        with self._mutex:
            mine = self._owner is _WRITER
        if mine:  # give the connection back, so a waiting inline batch is failed, not stuck
            self._writer_release()
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if isinstance(item, _Item):
                if item.start():
                    self._resolve([(item, False, self._unavailable())])
            elif isinstance(item, _Commit):  # an inline batch the loop ran: nothing is durable
                with contextlib.suppress(Exception):
                    if conn.in_transaction:
                        conn.rollback()
                failed = [(job, False, self._unavailable()) for job, _, _ in item.outcomes]
                self._writer_release(_Commit(failed, item.loop))

    def _gather(self) -> tuple[list[_Item], object]:
        """Jobs for the next batch and the control item that ended the gathering (a `_Commit`,
        `_STOP` or `_WAKE`), if any."""
        first = self._queue.get()
        if not isinstance(first, _Item):
            return [], first
        batch = [first]
        # a write batch waits LINGER once for one more job when the queue is empty
        may_linger = batch[0].write
        while len(batch) < MAX_BATCH:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                if not may_linger:
                    break
                may_linger = False
                try:
                    item = self._queue.get(timeout=LINGER)
                except queue.Empty:
                    break
            if not isinstance(item, _Item):
                return batch, item
            batch.append(item)
        return batch, None

    def _writer_take(self) -> bool:
        with self._mutex:
            if self._owner is _IDLE:
                self._owner = _WRITER
                return True
            self._writer_waiting = True  # the loop sends _WAKE, or a _Commit, when done
            return False

    def _writer_release(self, settle: _Commit | None = None) -> None:
        """Give the connection back and wake the loop if its inline batch is waiting; with
        `settle`, also hand that batch's results to its loop (in the same wake-up)."""
        with self._mutex:
            self._owner = _IDLE
            flush, self._loop_waiting = self._loop_waiting, False
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
            if settle is not None:
                settle.loop.call_soon_threadsafe(self._after_commit, settle.outcomes, flush)
            elif flush and self._inline_loop is not None:
                self._inline_loop.call_soon_threadsafe(self._flush)

    def _commit(self, conn: sqlite3.Connection, jobs: int) -> BaseException | None:
        """COMMIT the open transaction (ROLLBACK if that fails); the failure, if any."""
        try:
            self._checkpoint("before_commit")
            conn.commit()
            self._checkpoint("after_commit")
        except BaseException as exc:
            log.error("spool: batch of %d failed: %r", jobs, exc)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return exc
        self._count(jobs)
        return None

    def _commit_inline(self, conn: sqlite3.Connection, commit: _Commit) -> None:
        failure: BaseException | None = None
        try:
            failure = self._commit(conn, len(commit.outcomes))
        except BaseException as exc:  # even the ROLLBACK failed: answer everyone, then stop
            failure = exc
            raise
        finally:
            if failure is not None:
                failed = [(item, False, failure) for item, _, _ in commit.outcomes]
                commit = _Commit(failed, commit.loop)
            self._writer_release(commit)
        if failure is not None and not isinstance(failure, Exception):
            raise failure

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Item]) -> None:
        # A caller that was cancelled before we started gets nothing done (and nothing acked);
        # once running, a future can no longer be cancelled, so resolving it below is safe.
        batch = [item for item in batch if item.start()]
        if not batch:
            return
        writes = any(item.write for item in batch)
        outcomes: list[tuple[_Item, bool, Any]] = []
        failure: BaseException | None = None
        try:
            if writes:
                conn.execute("BEGIN IMMEDIATE")
            for item in batch:
                outcomes.append(self._run_job(conn, item, in_txn=writes))
        except BaseException as exc:
            log.error("spool: batch of %d failed: %r", len(batch), exc)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            failure = exc
        else:
            if writes:
                failure = self._commit(conn, len(batch))
            else:
                self._count(len(batch), committed=False)
        if failure is not None:
            self._resolve([(item, False, failure) for item in batch])
            if not isinstance(failure, Exception):
                raise failure
            return
        self._resolve(outcomes)

    @staticmethod
    def _resolve(outcomes: list[tuple[_Item, bool, Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Item, bool, Any]]] = {}
        for outcome in outcomes:
            item, ok, value = outcome
            if item.loop is not None:
                by_loop.setdefault(item.loop, []).append(outcome)
            elif isinstance(item.future, concurrent.futures.Future) and not item.future.done():
                if ok:
                    item.future.set_result(value)
                else:
                    item.future.set_exception(value)
        for loop, part in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, part)

    @staticmethod
    def _run_job(
        conn: sqlite3.Connection, item: _Item, *, in_txn: bool
    ) -> tuple[_Item, bool, Any]:
        # One savepoint name for every job: each is released before the next starts, and one
        # SQL text keeps the statements in sqlite3's cache (job0..job1023 were re-prepared).
        batched, in_txn = in_txn, in_txn and not item.atomic
        if in_txn:
            conn.execute("SAVEPOINT job")
        try:
            value = item.fn(conn)
        except Exception as exc:
            if batched and not conn.in_transaction:
                # SQLite rolled the whole transaction back (a full disk, an I/O error): the
                # batch's earlier jobs are undone too, so the batch fails as one, with this
                # error rather than "no such savepoint"
                raise
            if in_txn:
                conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
            return item, False, exc
        if in_txn:
            conn.execute("RELEASE job")
        return item, True, value
