"""Fixtures for the milter client tests: `milter` is the tests' own scriptable milter
(`tests.support.milter`), a fresh one per test, stopped after it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tests.support.milter import TestMilter


@pytest.fixture
def milter() -> Iterator[TestMilter]:
    with TestMilter() as m:
        yield m
