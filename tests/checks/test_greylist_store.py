"""The greylist database: decisions committed, kept across a reopen (a restart), expired and
bounded."""

from __future__ import annotations

import stat
from pathlib import Path

from mailhaven.checks.greylist import GreylistSettings
from mailhaven.checks.greylist_store import GreylistStore

S = GreylistSettings(delay=300, retry_window=3600, allow_lifetime=86400, auto_allow_after=1,
                     max_entries=50)


def test_triplets_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "greylist.sqlite"
    store = GreylistStore(path, S)
    assert not store.check_now("192.0.2.1", "a@x.test", "b@y.test", 1000).passed
    store.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = GreylistStore(path, S)
    assert not again.check_now("192.0.2.1", "a@x.test", "b@y.test", 1100).passed  # early
    assert again.check_now("192.0.2.1", "a@x.test", "b@y.test", 1301).passed
    again.close()


def test_auto_allowed_client_skips_the_delay_for_other_triplets(tmp_path: Path) -> None:
    store = GreylistStore(tmp_path / "g.sqlite", S)
    store.check_now("192.0.2.1", "a@x.test", "b@y.test", 0)
    assert store.check_now("192.0.2.9", "a@x.test", "b@y.test", 400).passed  # same /24
    decision = store.check_now("192.0.2.1", "new@x.test", "c@y.test", 500)
    assert decision.passed and decision.reason == "client allowed"
    assert not store.check_now("198.51.100.1", "new@x.test", "c@y.test", 500).passed


def test_expired_entries_are_purged_and_the_table_is_bounded(tmp_path: Path) -> None:
    store = GreylistStore(tmp_path / "g.sqlite", S)
    for n in range(40):
        store.check_now(f"10.0.{n}.1", "a@x.test", "b@y.test", 0)
    store.purge(3601)  # none retried within the window
    assert store.count() == 0
    for n in range(80):
        store.check_now(f"10.1.{n}.1", "a@x.test", "b@y.test", 4000 + n)
    store.purge(4100)
    assert store.count() == 50
    # the most recently seen are the ones kept
    assert not store.check_now("10.1.79.1", "a@x.test", "b@y.test", 4150).passed
    assert store.check_now("10.1.79.1", "a@x.test", "b@y.test", 4400).passed


async def test_async_check_runs_in_a_thread(tmp_path: Path) -> None:
    store = GreylistStore(tmp_path / "g.sqlite", S)
    decision = await store.check("192.0.2.1", "", "b@y.test", 0)
    assert not decision.passed and decision.wait == 300
    store.close()
