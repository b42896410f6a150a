from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.spool.spool_helpers import FakeClock

from mailhaven.spool import Spool


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def spool(tmp_path: Path, clock: FakeClock) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool", inline_limit=4096, clock=clock)
    s.open()
    yield s
    s.close()
