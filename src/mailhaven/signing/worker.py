"""The signing thread: private-key operations off the event loop's thread, answers in batches.

In: `await worker.run(work, *args)` from a coroutine. Out: `work(*args)`'s result (or its
exception), computed in the worker's one thread (`runtime.job_threads`: a queue put per job
and one loop wake-up per batch of answers, not `loop.run_in_executor`'s concurrent future and
wake-up per job; a job here is a few hundred microseconds).

Why a thread helps at all: the `cryptography` package lets go of the interpreter lock while
OpenSSL signs, so the arithmetic runs on another core while the loop serves other sessions.

Invariants: jobs run in submission order; `close()` lets the thread finish the jobs it holds
and exit; `run` after `close` runs the job in the caller's thread (a reload replaced the
worker while a message was being signed: the signature is still made).
"""

from __future__ import annotations

from mailhaven.runtime.job_threads import JobThreads


class SigningThread(JobThreads):
    def __init__(self, name: str = "dkim-sign") -> None:
        super().__init__(name, 1)
