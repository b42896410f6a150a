"""Which asyncio event loop runs the engine (`event_loop` in the configuration).

Why a choice: the standard library's selector loop does its transport bookkeeping in Python;
uvloop (libuv, compiled) does it in C behind the same `asyncio` interfaces we use (protocols,
`BufferedProtocol`, `start_tls`, `add_reader`, executors, signal handlers). Idle connections
cost less memory on it; throughput gains little, because most of a message's time is our own
Python, not the loop's (docs/benchmarks.md).
It stays an optional extra (`pip install mailhaven[uvloop]`): the default is the standard
library, and nothing in mailhaven depends on which loop runs it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

#: the values of `event_loop` (checked by `config.validate`)
CHOICES = ("asyncio", "uvloop")


class LoopUnavailable(RuntimeError):
    """The configured event loop cannot be used here (uvloop not installed)."""


def run(kind: str, main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the event loop `kind` ("asyncio" or "uvloop")."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            main.close()
            raise LoopUnavailable(
                'event_loop = "uvloop" but uvloop is not installed '
                "(pip install 'mailhaven[uvloop]')"
            ) from None
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)
