"""Suite-wide settings and hooks.

The hypothesis profile CI runs with: with CI=true (as `.ci/run` sets it) property tests run
derandomized and without the example database, so a CI run is reproducible from the commit
alone: the same examples every time, and nothing read from or written to a local `.hypothesis`
directory. HYPOTHESIS_PROFILE names another profile explicitly (e.g. `dev` to explore new random
inputs).

Shared fixtures: `clock` (a `tests.fakes.FakeClock`), `spool` (an open Spool on that clock, in
the test's temporary directory, small inline limit so bodies spill to files early), `ca` (a
trustme certificate authority), `dkim_key` (`tests.fakes.dkim_rsa_key`, one per module) and
`acme_ca` (pebble, a real ACME CA, issuing for `tests.support.pebble.DOMAIN`). A package that
needs other values overrides the fixture in its own conftest.py.

`pytest.mark.both_loops` on an async test (or module) runs it once on the standard library's
event loop and once on uvloop (ids `[asyncio]`, `[uvloop]`): for servers run in the test's own
loop, what `event_loop = "uvloop"` does for `mailhaven serve`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
import uvloop
from hypothesis import settings
from tests.fakes import FakeClock, dkim_rsa_key
from tests.support import pebble

from mailhaven.spool import Spool

settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)

_profile = os.environ.get("HYPOTHESIS_PROFILE") or (
    "ci" if os.environ.get("CI", "").lower() in ("true", "1") else None
)
if _profile:
    settings.load_profile(_profile)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.get_closest_marker("both_loops") is None:
        return {"asyncio": asyncio.new_event_loop}
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def spool(tmp_path: Path, clock: FakeClock) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool", inline_limit=4096, clock=clock)
    s.open()
    yield s
    s.close()


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def dkim_key() -> tuple[bytes, str]:
    return dkim_rsa_key()


@pytest.fixture
def acme_ca(tmp_path: Path) -> Iterator[pebble.AcmeCA]:
    running = pebble.AcmeCA(tmp_path, pebble.DOMAIN)
    yield running
    running.stop()
