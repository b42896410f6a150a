"""CPU microbenchmarks of two per-message pieces, for the numbers docs/benchmarks.md quotes.

    .venv/bin/python bench/micro.py

- a maillog info line: `logger.info` through our handler vs `maillog.info` (the hot path's
  fast path), 100,000 lines logged inside a running event loop to a stream that discards;
- a queue id: `QueueIdFactory()` (two base-32 renderings).

Prints µs per operation, the best of five rounds. On-demand only, like the rest of bench/.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Callable

from mailhaven import maillog
from mailhaven.spool.ids import QueueIdFactory

LINES = 100_000
ROUNDS = 5


class _Discard(io.TextIOBase):
    def write(self, s: str) -> int:
        return len(s)


async def _lines(log_one: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    for i in range(LINES):
        log_one()
        if i % 50 == 0:
            await asyncio.sleep(0)  # let the handler's batch go out, as the daemon's loop does
    return (time.perf_counter() - t0) / LINES


def _best(run: Callable[[], float]) -> float:
    return 1e6 * min(run() for _ in range(ROUNDS))


def main() -> None:
    maillog.setup("mh.bench.test", "info", _Discard())
    log = logging.getLogger("mailhaven.smtpd")
    args = ("4ZX7A1B2C3D4EFG", "unknown[127.0.0.1]", "")

    def plain() -> None:
        log.info("%s: client=%s%s", *args)

    def fast() -> None:
        maillog.info(log, "%s: client=%s%s", *args)

    print(f"logger.info   {_best(lambda: asyncio.run(_lines(plain))):6.2f} µs/line")
    print(f"maillog.info  {_best(lambda: asyncio.run(_lines(fast))):6.2f} µs/line")
    make = QueueIdFactory()

    def ids() -> float:
        t0 = time.perf_counter()
        for _ in range(LINES):
            make()
        return (time.perf_counter() - t0) / LINES

    print(f"queue id      {_best(ids):6.2f} µs/id")


if __name__ == "__main__":
    main()
