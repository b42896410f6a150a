"""Blocking jobs for an event loop, on threads of our own: a queue put in, one wake-up back.

In: `submit(work, *args)` (an `asyncio.Future`) or `await run(work, *args)` from the loop's
thread. Out: `work(*args)`'s result or exception, computed in one of the pool's threads.

Why not `loop.run_in_executor`: for jobs of a few hundred microseconds (a DKIM signature, a
Maildir copy) its hand-over is a large part of the cost on the loop's thread: a concurrent
future with its lock and condition, the chaining of two futures, and a loop wake-up per job.
Here a job is a queue put, and a thread hands back everything it finished before the queue ran
dry with one `call_soon_threadsafe` (docs/benchmarks.md, "Appendix").

Invariants: with one thread, jobs run in submission order. A job's future is resolved on its
loop's thread, unless the caller cancelled it; a job is never dropped once queued. `close()`
lets the threads finish the jobs queued and exit (not waited for); `run`/`submit` after
`close` run the job in the caller's thread. The threads are daemons and made on first use, so
a process that forks later has none, and exiting never waits for an idle one.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]
_Done = tuple["asyncio.Future[Any]", Any, BaseException | None]


class JobThreads:
    """`count` threads sharing one queue of jobs."""

    def __init__(self, name: str, count: int = 1) -> None:
        self._name = name
        self._count = count
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def submit(self, work: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if self._closed:
            _settle_one(future, work, args)
            return future
        if not self._threads:
            self._start()
        self._jobs.put((loop, future, work, args))
        return future

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        return await self.submit(work, *args)

    def close(self) -> None:
        """The threads finish the jobs already queued, then exit (not waited for)."""
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)

    def _start(self) -> None:
        for index in range(self._count):
            name = self._name if self._count == 1 else f"{self._name}-{index}"
            thread = threading.Thread(target=self._serve, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self) -> None:
        done: dict[asyncio.AbstractEventLoop, list[_Done]] = {}
        while True:
            job = self._jobs.get()
            if job is None:
                break
            loop, future, work, args = job
            try:
                done.setdefault(loop, []).append((future, work(*args), None))
            except BaseException as err:  # handed to the awaiting coroutine, never lost
                done.setdefault(loop, []).append((future, None, err))
            if self._jobs.empty():
                _hand_back(done)
                done = {}
        _hand_back(done)


def _hand_back(done: dict[asyncio.AbstractEventLoop, list[_Done]]) -> None:
    for loop, results in done.items():
        with contextlib.suppress(RuntimeError):  # that loop is closed: no one waits
            loop.call_soon_threadsafe(_settle, results)


def _settle(results: list[_Done]) -> None:
    for future, value, err in results:
        if future.cancelled():
            continue
        if err is not None:
            future.set_exception(err)
        else:
            future.set_result(value)


def _settle_one(future: asyncio.Future[Any], work: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        future.set_result(work(*args))
    except BaseException as err:
        future.set_exception(err)
