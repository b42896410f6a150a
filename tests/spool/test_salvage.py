"""Rebuilding a damaged queue database (`spool.salvage`, issue 16 item 16): readable rows keep
their recipients' states, big messages come back from the envelope record in their body file, and a spool
whose database has a damaged page still opens."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from tests.fakes import FakeClock, put

from mailhaven.proto.replies import Reply
from mailhaven.spool import RecipientUpdate, Spool, Status, list_queue
from mailhaven.spool.salvage import check, salvage

BIG = b"Subject: big\r\n\r\n" + b"B" * 8192  # over the 4 KiB inline limit of these tests


async def _fill(root: Path, clock: FakeClock, count: int) -> tuple[list[str], str]:
    s = Spool(root, inline_limit=4096, clock=clock)
    s.open()
    small = [await put(s, b"Subject: s\r\n\r\n" + b"s" * 1500, f"r{i}@example.net")
             for i in range(count)]
    big = await put(s, BIG, "big@example.net", "other@example.net")
    deferred = RecipientUpdate(0, Status.DEFERRED, clock.now + 600, Reply(451, "later", "4.0.0"))
    await s.record(small[0], [deferred])
    s.close()
    return small, big


async def test_a_sound_database_rebuilt_keeps_every_message_and_state(
    tmp_path: Path, clock: FakeClock
) -> None:
    root = tmp_path / "spool"
    small, big = await _fill(root, clock, 5)
    assert check(root / "queue.db") is None
    report = salvage(root, clock=clock.now)
    assert (report.from_rows, report.from_files, report.unrecoverable) == (6, 0, 0)
    listed = {m.queue_id: m for m in list_queue(root)}
    assert set(listed) == {*small, big}
    assert listed[small[0]].recipients[0].status is Status.DEFERRED


async def test_a_lost_database_comes_back_from_the_body_files(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "spool"
    _, big = await _fill(root, clock, 2)
    for name in ("queue.db", "queue.db-wal", "queue.db-shm"):
        (root / name).unlink(missing_ok=True)
    assert check(root / "queue.db") is not None  # missing, but message files remain
    s = Spool(root, inline_limit=4096, clock=clock)
    with caplog.at_level(logging.WARNING, logger="mailhaven.spool"):
        s.open()
    try:
        assert "queue.db is damaged" in caplog.text and "queue rebuilt" in caplog.text
        msg = await s.load(big)
        assert msg is not None
        with msg.open() as f:
            assert f.read().endswith(BIG)
        assert [r.address for r in await s.recipients(big)] == [
            "big@example.net", "other@example.net"]
    finally:
        s.close()


async def test_a_damaged_page_does_not_stop_the_spool(tmp_path: Path, clock: FakeClock) -> None:
    root = tmp_path / "spool"
    _, big = await _fill(root, clock, 200)
    db = root / "queue.db"
    pages = os.path.getsize(db) // 4096
    with open(db, "r+b") as f:  # garble one page in the middle of the file
        f.seek((pages // 2) * 4096)
        f.write(os.urandom(4096))
    assert check(db) is not None
    s = Spool(root, inline_limit=4096, clock=clock)
    s.open()
    try:
        assert check(db) is None  # it now runs on a sound, rebuilt database
        assert list(root.glob("damaged-*/queue.db"))  # the damaged one was kept aside
        listed = {m.queue_id for m in list_queue(root)}
        assert big in listed  # from its body file, or its row
        assert len(listed) > 100  # most rows were still readable
    finally:
        s.close()
