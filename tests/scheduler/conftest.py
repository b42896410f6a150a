"""The scheduler's tests run on a clock of their own (small numbers read well in assertions)."""

from __future__ import annotations

import pytest
from tests.fakes import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)
