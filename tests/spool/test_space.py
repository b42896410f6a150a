"""A full disk while a delivery result is recorded (issue 16, item 15).

The spool lives on a small tmpfs the test mounts (skipped where mounting is not allowed); the
rest of the file system is then filled. Recording "delivered" must still succeed (the spool's
reserve gives the space back), and when even that is gone it must wait for space, not fail:
a lost result means the message is delivered again after the next restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.fakes import FakeClock, put
from tests.support.small_fs import fill, small_tmpfs

from mailhaven.proto.replies import Reply
from mailhaven.spool import RecipientUpdate, Spool, Status

MiB = 1024 * 1024
SENT = Reply(250, "2.0.0 Ok", "2.0.0")


@pytest.fixture
def full_spool(tmp_path: Path, clock: FakeClock) -> Iterator[tuple[Spool, Path]]:
    with small_tmpfs(tmp_path / "fs", size=4 * MiB) as root:
        s = Spool(root / "spool", inline_limit=4096, clock=clock, minfree=0)
        s.open()
        try:
            yield s, root / "filler"
        finally:
            s.close()


def _delivered(*indexes: int) -> list[RecipientUpdate]:
    return [RecipientUpdate(i, Status.SENT, None, SENT) for i in indexes]


async def test_delivered_is_recorded_on_a_full_disk(full_spool: tuple[Spool, Path]) -> None:
    spool, filler = full_spool
    qids = [await put(spool, b"Subject: x\r\n\r\n" + b"y" * 2000, f"r{i}@example.net")
            for i in range(20)]
    fill(filler)
    for qid in qids:
        remaining, removed = await spool.record_and_finish(qid, _delivered(0))
        assert (remaining, removed) == (0, True)
        assert await spool.load(qid) is None
    assert not spool.reserve.path.exists()  # it was given back to record the results
    filler.unlink()
    assert spool.storage_refusal() is None
    assert spool.reserve.held  # made again once space returned


async def test_a_result_waits_for_space_instead_of_failing(
    full_spool: tuple[Spool, Path]
) -> None:
    spool, filler = full_spool
    qid = await put(spool, b"Subject: x\r\n\r\n" + b"y" * 2000, "a@example.net", "b@example.net")
    spool.reserve.path.unlink()  # already spent
    fill(filler)
    task = asyncio.ensure_future(spool.record(qid, _delivered(0)))
    await asyncio.sleep(0.3)
    assert not task.done()  # still trying, not failed
    filler.unlink()
    assert await asyncio.wait_for(task, 10) == 1
    states = await spool.recipients(qid)
    assert [s.status for s in states] == [Status.SENT, Status.PENDING]
