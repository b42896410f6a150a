"""The signing thread: private-key operations off the event loop's thread, answers in batches.

In: `await worker.run(work, *args)` from a coroutine. Out: `work(*args)`'s result (or its
exception), computed in the worker's one thread. Why a thread of our own and not
`loop.run_in_executor`: a job here is a few hundred microseconds, so what the hand-over costs
the loop matters; this one costs a queue put and, for the answers, one loop wake-up per batch
(the thread hands back everything it finished before its queue ran dry) instead of a
concurrent future, its lock and a wake-up per job.

Why a thread helps at all: the `cryptography` package lets go of the interpreter lock while
OpenSSL signs, so the arithmetic runs on another core while the loop serves other sessions.

Invariants: jobs run in submission order; `close()` lets the thread finish the jobs it holds
and exit; `run` after `close` runs the job in the caller's thread (a reload replaced the
worker while a message was being signed: the signature is still made).
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


class SigningThread:
    def __init__(self, name: str = "dkim-sign") -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        if self._closed:
            return work(*args)
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
            self._thread.start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, future, work, args))
        return await future

    def close(self) -> None:
        """The thread finishes the jobs already queued, then exits (not waited for)."""
        self._closed = True
        if self._thread is not None:
            self._jobs.put(None)

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
                self._hand_back(done)
                done = {}
        self._hand_back(done)

    @staticmethod
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
