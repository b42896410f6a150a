"""Group commit: one thread owns the SQLite connection and commits many callers' work at once.

Why: with `synchronous=FULL` every COMMIT costs a WAL fsync (about 0.6 ms on our disks, so at most
~1,650 commits/s one by one). Sessions hand their work to this thread as jobs; the thread takes
the first job, then every job queued behind it, runs them all in ONE transaction (each inside its
own SAVEPOINT so one failing job cannot spoil the others), commits once, and only then resolves
each caller's future. Throughput grows with concurrency instead of being capped by fsync latency.

A job is a function of the connection. Its result (or exception) reaches the caller only after
the COMMIT has returned, so a caller that sees success knows its writes are durable. If the
COMMIT itself fails, every job of the batch fails. Read-only jobs skip the transaction.

A job that is atomic by itself (`atomic=True`: one statement, or one that undoes its own
partial work when it fails, with `savepoint` or otherwise) runs without the SAVEPOINT/RELEASE
pair. Why: every statement gives up the GIL and takes it back, and for the two jobs of a
relayed message (insert, delete) the pair was half of the statements (9 -> 3 with the
one-statement delete). Measured, the relay rate did not change beyond the noise (bench/ab.py:
0.98x): this thread runs beside the event loop, which is the busy one; it is less work anyway.

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
#: Seconds a write batch waits, once, for one more job when the queue ran empty (PostgreSQL's
#: commit_delay, MySQL's binlog_group_commit_sync_delay). Why: with `smtp_processes = 2` each
#: process saw ~2 jobs per transaction against ~9 in one process, and every transaction costs
#: a BEGIN/COMMIT, its WAL pages and an fsync. Measured (bench/ab.py, 4-5 runs each): 0.3 ms
#: against none, CPU per relayed message 1.62 -> 1.49 ms (two processes), 1.16 -> 1.10 ms
#: (one); 1 ms against 0.3 ms, relay 1.10x (two processes) and 1.07x (one), acceptance 1.07x
#: (two) and 0.98x (one, within the noise). The price: a lone commit answers 1 ms later.
LINGER = 0.001


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


_STOP = object()


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
        self._queue: queue.SimpleQueue[_Item | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.stats = CommitStats()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="spool-writer", daemon=True)
        self._thread.start()
        self._ready.result()  # re-raises an open error in the caller

    def stop(self) -> None:
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join()
        self._thread = None

    def submit(
        self, fn: Job[T], *, write: bool = True, atomic: bool = False
    ) -> concurrent.futures.Future[T]:
        """Queue a job; the future resolves after the batch containing it is committed."""
        if self._thread is None:
            raise RuntimeError("spool is not open")
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put(_Item(fn, fut, write, atomic=atomic))
        return fut

    async def run(self, fn: Job[T], *, write: bool = True, atomic: bool = False) -> T:
        """`submit` for coroutines. A batch's results reach their event loop in ONE
        `call_soon_threadsafe` (one wake-up of the loop per commit, not one per job)."""
        if self._thread is None:
            raise RuntimeError("spool is not open")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Item(fn, fut, write, loop, atomic))
        return await fut

    def call(self, fn: Job[T], *, write: bool = True) -> T:
        """`submit` for synchronous callers (start-up, CLI); blocks until committed."""
        return self.submit(fn, write=write).result()

    # -- the thread --------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            conn = connect(self._path)
        except BaseException as exc:
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        try:
            while True:
                first = self._queue.get()
                if first is _STOP:
                    return
                batch = [first]
                stopping = False
                # a write batch waits LINGER once for one more job when the queue is empty
                may_linger = isinstance(first, _Item) and first.write
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
                    if item is _STOP:
                        stopping = True
                        break
                    batch.append(item)
                self._run_batch(conn, [i for i in batch if isinstance(i, _Item)])
                if stopping:
                    return
        finally:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Item]) -> None:
        # A caller that was cancelled before we started gets nothing done (and nothing acked);
        # once running, a future can no longer be cancelled, so resolving it below is safe.
        batch = [item for item in batch if item.start()]
        if not batch:
            return
        writes = any(item.write for item in batch)
        outcomes: list[tuple[_Item, bool, Any]] = []
        try:
            if writes:
                conn.execute("BEGIN IMMEDIATE")
            for item in batch:
                outcomes.append(self._run_job(conn, item, in_txn=writes))
            if writes:
                self._checkpoint("before_commit")
                conn.execute("COMMIT")
                self._checkpoint("after_commit")
                self.stats.transactions += 1
        except BaseException as exc:
            log.error("spool: batch of %d failed: %r", len(batch), exc)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._resolve([(item, False, exc) for item in batch])
            if not isinstance(exc, Exception):
                raise
            return
        self.stats.jobs += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
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
        in_txn = in_txn and not item.atomic
        if in_txn:
            conn.execute("SAVEPOINT job")
        try:
            value = item.fn(conn)
        except Exception as exc:
            if in_txn:
                conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
            return item, False, exc
        if in_txn:
            conn.execute("RELEASE job")
        return item, True, value
