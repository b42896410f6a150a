"""Suite-wide pytest hooks.

`pytest.mark.both_loops` on an async test (or module) runs it once on the standard library's
event loop and once on uvloop (ids `[asyncio]`, `[uvloop]`): for servers run in the test's own
loop, what `event_loop = "uvloop"` does for `mailhaven serve`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import uvloop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.get_closest_marker("both_loops") is None:
        return {"asyncio": asyncio.new_event_loop}
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
