"""Job threads: one thread keeps submission order; with several, every job's answer reaches
its own future, jobs run in parallel, a cancelled caller does not lose the others, and close()
hands over the queue."""

from __future__ import annotations

import asyncio
import threading

import pytest

from mailhaven.runtime.job_threads import JobThreads


def where(tag: int) -> tuple[int, str]:
    return tag, threading.current_thread().name


async def test_each_answer_reaches_its_own_future() -> None:
    pool = JobThreads("copy", 4)
    try:
        results = await asyncio.gather(*(pool.run(where, i) for i in range(200)))
    finally:
        pool.close()
    assert [tag for tag, _ in results] == list(range(200))
    assert {name for _, name in results} <= {f"copy-{i}" for i in range(4)}


async def test_one_thread_runs_the_jobs_in_submission_order() -> None:
    """What the DKIM signer relies on (`signing.outbound`: one thread, "dkim-sign")."""
    pool = JobThreads("dkim-sign", 1)
    ran: list[int] = []
    try:
        results = await asyncio.gather(*(pool.run(lambda i=i: (ran.append(i), where(i))[1])
                                         for i in range(50)))
    finally:
        pool.close()
    assert ran == list(range(50))
    assert {name for _, name in results} == {"dkim-sign"}


async def test_jobs_run_in_parallel() -> None:
    pool = JobThreads("copy", 3)
    barrier = threading.Barrier(3, timeout=10)  # only passes if three jobs run at once
    try:
        await asyncio.wait_for(asyncio.gather(*(pool.run(barrier.wait) for _ in range(3))), 20)
    finally:
        pool.close()


async def test_errors_and_cancelled_callers_leave_the_others_alone() -> None:
    pool = JobThreads("copy", 2)

    def fail() -> None:
        raise OSError("disk gone")

    try:
        gone = pool.submit(where, 1)
        gone.cancel()
        with pytest.raises(OSError, match="disk gone"):
            await pool.run(fail)
        assert (await pool.run(where, 2))[0] == 2
    finally:
        pool.close()


async def test_after_close_a_job_runs_in_the_callers_thread() -> None:
    pool = JobThreads("copy", 2)
    queued = pool.submit(where, 1)
    pool.close()  # the queued job is still done by a pool thread
    assert (await queued)[1].startswith("copy-")
    assert await pool.run(where, 2) == (2, threading.current_thread().name)
