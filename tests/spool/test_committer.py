"""Committer: inline batches run on the event loop, their COMMIT on the writer thread, and the
connection is never used by both at once."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from tests.fakes import FailingCommit, put

from mailhaven.spool import Spool, list_queue


def _insert(tag: str) -> tuple[str, object]:
    """An inline-sized job that writes one row and says on which thread it ran."""

    def job(conn: sqlite3.Connection) -> int:
        conn.execute(
            "INSERT INTO message (qid, arrival, sender, envelope, header, size)"
            " VALUES (?, 0, '', '{}', x'', 0)",
            (tag,),
        )
        return threading.get_ident()

    return tag, job


def _count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM message").fetchone()[0])


class Gate:
    """A checkpoint hook that holds the writer thread at its next "before_commit"."""

    def __init__(self) -> None:
        self.armed = False
        self.reached = threading.Event()
        self.opened = threading.Event()
        self.threads: list[int] = []

    def __call__(self, point: str) -> None:
        if point != "before_commit":
            return
        self.threads.append(threading.get_ident())
        if self.armed:
            self.armed = False
            self.reached.set()
            assert self.opened.wait(30)

    async def wait_reached(self) -> None:
        assert await asyncio.to_thread(self.reached.wait, 30)


@pytest.fixture
def gated(tmp_path: Path) -> tuple[Spool, Gate]:
    gate = Gate()
    s = Spool(tmp_path / "q", inline_limit=4096, checkpoint=gate)
    s.open()
    yield s, gate  # type: ignore[misc]
    gate.opened.set()
    s.close()


async def test_inline_jobs_of_one_turn_run_on_the_loop_and_commit_once(
    gated: tuple[Spool, Gate],
) -> None:
    spool, gate = gated
    before = spool.stats.transactions
    jobs = [_insert(f"m{i}")[1] for i in range(20)]
    threads = await asyncio.gather(*(spool._committer.run(j, inline=True) for j in jobs))
    assert set(threads) == {threading.get_ident()}  # the statements ran on this loop's thread
    assert spool.stats.transactions - before == 1  # one COMMIT for all twenty
    assert gate.threads[-1] != threading.get_ident()  # ... made by the writer thread
    assert await spool._committer.run(_count, write=False) == 20


async def test_an_inline_batch_waits_while_the_writer_thread_holds_the_connection(
    gated: tuple[Spool, Gate],
) -> None:
    spool, gate = gated
    order: list[str] = []

    def thread_job(conn: sqlite3.Connection) -> None:
        _insert("t")[1](conn)
        order.append("thread")

    def inline_job(conn: sqlite3.Connection) -> None:
        _insert("i")[1](conn)
        order.append("inline")

    gate.armed = True
    held = asyncio.ensure_future(spool._committer.run(thread_job))
    await gate.wait_reached()  # the writer thread is inside its transaction
    waiting = asyncio.ensure_future(spool._committer.run(inline_job, inline=True))
    for _ in range(20):
        await asyncio.sleep(0.005)
    assert order == ["thread"]  # the loop did not touch the connection meanwhile
    gate.opened.set()
    await asyncio.gather(held, waiting)
    assert order == ["thread", "inline"]
    assert await spool._committer.run(_count, write=False) == 2


async def test_a_writer_job_waits_for_the_inline_commit_in_flight(
    gated: tuple[Spool, Gate],
) -> None:
    spool, gate = gated
    gate.armed = True
    committing = asyncio.ensure_future(spool._committer.run(_insert("i")[1], inline=True))
    await gate.wait_reached()  # the inline batch's COMMIT is held on the writer thread
    later = spool._committer.submit(_count, write=False)  # from any thread: the writer's path
    await asyncio.sleep(0.05)
    assert not later.done()
    gate.opened.set()
    await committing
    assert await asyncio.wrap_future(later) == 1  # it ran after the commit, and saw it


async def test_a_failed_inline_commit_fails_every_job_and_frees_the_connection(
    tmp_path: Path,
) -> None:
    failing = FailingCommit()
    s = Spool(tmp_path / "q", inline_limit=4096, checkpoint=failing)
    s.open()
    failing.armed = True
    try:
        results = await asyncio.gather(
            put(s, b"one"), put(s, b"two"), return_exceptions=True
        )
        assert all(isinstance(r, OSError) for r in results)
        assert list(list_queue(s.root)) == []
        failing.armed = False
        assert await put(s, b"three")  # the next batch gets the connection
        assert len(list(list_queue(s.root))) == 1
    finally:
        s.close()


@pytest.mark.parametrize("inline", [True, False])
async def test_a_job_that_loses_the_transaction_fails_its_whole_batch_with_its_error(
    gated: tuple[Spool, Gate], inline: bool
) -> None:
    """SQLite itself rolls the transaction back on a full disk or an I/O error; the jobs
    before it in the batch are undone, so none of them may be reported as done."""
    spool, gate = gated

    def lost(conn: sqlite3.Connection) -> None:
        _insert("lost")[1](conn)
        conn.execute("ROLLBACK")  # what SQLite does on SQLITE_FULL or SQLITE_IOERR
        raise sqlite3.OperationalError("database or disk is full")

    if not inline:  # queue both behind a held commit, so the writer thread batches them
        gate.armed = True
        held = asyncio.ensure_future(spool._committer.run(_insert("first")[1]))
        await gate.wait_reached()
    jobs = [spool._committer.run(fn, inline=inline) for fn in (_insert("ok")[1], lost)]
    if inline:
        results = await asyncio.gather(*jobs, return_exceptions=True)
    else:
        futures = [asyncio.ensure_future(j) for j in jobs]
        await asyncio.sleep(0.05)
        gate.opened.set()
        await held
        results = await asyncio.gather(*futures, return_exceptions=True)
    assert [str(r) for r in results] == ["database or disk is full"] * 2
    assert await spool._committer.run(_count, write=False) == (0 if inline else 1)
    assert await spool._committer.run(_insert("after")[1])  # the connection is usable


async def test_a_read_only_inline_batch_commits_nothing(gated: tuple[Spool, Gate]) -> None:
    spool, _ = gated
    qid = await put(spool, b"body")
    before = spool.stats.transactions
    msg = await spool.load(qid)
    assert msg is not None and msg.queue_id == qid
    assert spool.stats.transactions == before


async def test_close_runs_inline_jobs_not_started_yet(tmp_path: Path) -> None:
    s = Spool(tmp_path / "q", inline_limit=4096)
    s.open()
    task = asyncio.ensure_future(put(s, b"late"))
    await asyncio.sleep(0)  # the job is gathered; its flush has not run yet
    s.close()  # blocks this loop: the writer thread runs the job before it stops
    qid = await asyncio.wait_for(task, 10)  # a dropped job would leave it waiting forever
    s = Spool(tmp_path / "q", inline_limit=4096)
    s.open()
    try:
        assert await s.load(qid) is not None
    finally:
        s.close()


async def test_the_writer_thread_keeps_off_the_connection_while_the_loop_runs_jobs(
    gated: tuple[Spool, Gate],
) -> None:
    spool, _ = gated
    order: list[str] = []
    handed: list[object] = []

    def thread_job(conn: sqlite3.Connection) -> int:
        order.append("thread")
        return _count(conn)

    def inline_job(conn: sqlite3.Connection) -> None:
        _insert("i")[1](conn)
        handed.append(spool._committer.submit(thread_job))
        time.sleep(0.05)  # a slow statement: the writer thread has the other job meanwhile
        order.append("inline")

    await spool._committer.run(inline_job, inline=True)
    assert await asyncio.wrap_future(handed[0]) == 1  # type: ignore[arg-type]
    assert order == ["inline", "thread"]  # deferred until the loop's batch had committed


class WriterKiller(BaseException):
    """Not an Exception: the writer thread re-raises it, as it does a failed ROLLBACK."""


class FatalCommit:
    """A checkpoint hook that makes the next COMMIT fail in a way the writer thread cannot
    survive (in the field: the COMMIT fails and so does its ROLLBACK, the disk is gone)."""

    def __init__(self) -> None:
        self.armed = False

    def __call__(self, point: str) -> None:
        if self.armed and point == "before_commit":
            self.armed = False
            raise WriterKiller


@pytest.mark.parametrize("inline", [True, False])
async def test_after_the_writer_thread_fails_every_job_fails_at_once(
    tmp_path: Path, inline: bool
) -> None:
    fatal = FatalCommit()
    s = Spool(tmp_path / "q", inline_limit=4096, checkpoint=fatal)
    s.open()
    try:
        fatal.armed = True
        with pytest.raises(WriterKiller):  # the batch in flight fails with what killed it
            await asyncio.wait_for(s._committer.run(_insert("a")[1], inline=inline), 10)
        for tag in ("b", "c"):  # later jobs: an answer at once, never a hang
            with pytest.raises(OSError, match="writer failed"):
                await asyncio.wait_for(s._committer.run(_insert(tag)[1], inline=inline), 10)
        with pytest.raises(OSError, match="writer failed"):
            await asyncio.wait_for(put(s, b"a message"), 10)
        with pytest.raises(OSError, match="writer failed") as first:
            s._committer.submit(_count, write=False)
        with pytest.raises(OSError, match="writer failed") as second:
            s._committer.submit(_count, write=False)
        assert first.value is not second.value  # each caller its own (tracebacks do not pile up)
        assert isinstance(first.value.__cause__, WriterKiller)
    finally:
        s.close()  # stops the thread (it waits as a sink until then)
    s2 = Spool(tmp_path / "q", inline_limit=4096)
    s2.open()  # a restart opens the spool afresh
    try:
        assert await put(s2, b"after the restart")
        assert len(list(list_queue(s2.root))) == 1
    finally:
        s2.close()
