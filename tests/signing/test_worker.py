"""The signing thread: results and errors come back to the awaiting coroutine, in order, and
after `close` jobs run in the caller's thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from mailhaven.signing.worker import SigningThread


def where(tag: int) -> tuple[int, str]:
    return tag, threading.current_thread().name


def fail() -> None:
    raise ValueError("not a key")


async def test_jobs_run_in_the_thread_and_come_back_in_order() -> None:
    worker = SigningThread("sign-test")
    try:
        results = await asyncio.gather(*(worker.run(where, i) for i in range(50)))
    finally:
        worker.close()
    assert [tag for tag, _ in results] == list(range(50))
    assert {name for _, name in results} == {"sign-test"}


async def test_an_error_reaches_the_caller_and_the_thread_goes_on() -> None:
    worker = SigningThread()
    try:
        with pytest.raises(ValueError, match="not a key"):
            await worker.run(fail)
        assert (await worker.run(where, 1))[0] == 1
    finally:
        worker.close()


async def test_after_close_jobs_run_here() -> None:
    worker = SigningThread()
    first = asyncio.ensure_future(worker.run(where, 1))
    await asyncio.sleep(0)  # queued
    worker.close()  # the queued job is still done by the thread
    assert (await first)[1] == "dkim-sign"
    assert await worker.run(where, 2) == (2, threading.current_thread().name)


async def test_a_cancelled_caller_does_not_break_the_others() -> None:
    worker = SigningThread()
    try:
        gone = asyncio.ensure_future(worker.run(where, 1))
        kept = asyncio.ensure_future(worker.run(where, 2))
        await asyncio.sleep(0)
        gone.cancel()
        assert (await kept)[0] == 2
    finally:
        worker.close()
