"""Which asyncio event loop runs the engine (`event_loop` in the configuration).

Why a choice: the standard library's selector loop does its transport bookkeeping in Python;
uvloop (libuv, compiled) does it in C behind the same `asyncio` interfaces we use (protocols,
`BufferedProtocol`, `start_tls`, `add_reader`, executors, signal handlers). Idle connections
cost less memory on it; throughput gains little, because most of a message's time is our own
Python, not the loop's (docs/benchmarks.md). uvloop is the default and a regular dependency;
where it cannot be imported (a platform without a wheel), the engine runs on the standard
library's loop and the log says so, rather than refusing to start. Nothing in mailhaven depends
on which loop runs it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

#: the values of `event_loop` (checked by `config.validate`)
CHOICES = ("asyncio", "uvloop")


#: the default (`Config.event_loop`)
DEFAULT = "uvloop"


def run(kind: str, main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the event loop `kind` ("asyncio" or "uvloop"); uvloop missing
    falls back to asyncio's loop with a warning."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            logging.getLogger("mailhaven.master").warning(
                'event_loop = "uvloop" but uvloop cannot be imported here: '
                "running on the standard library's loop"
            )
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(main)
    return asyncio.run(main)
