"""The active queue, the seam between intake and the scheduler: new mail is handed over whole
while there is room (bounded by count and bytes), committed plainly otherwise, and given back
to the spool on demand."""

from __future__ import annotations

import asyncio

import pytest
from tests.fakes import FakeClock, Wake, envelope, queued

from mailhaven.scheduler import active as active_module
from mailhaven.scheduler.active import ActiveQueue
from mailhaven.spool import FreshMessage, Spool


async def commit(
    queue: ActiveQueue, spool: Spool, rcpt: str, *, body: bytes = b"x\r\n", held: bool = False
) -> str:
    w = spool.new_message()
    w.write(body)
    await queue.commit(w, envelope(rcpt), queued(rcpt), b"Received: t\r\n", attemptable=not held)
    return w.queue_id


def running(spool: Spool, wake: Wake, arrived: Wake | None = None) -> ActiveQueue:
    """A queue whose runner runs; `wake` counts plain commits, `arrived` handed-over ones."""
    queue = ActiveQueue(spool, wake=wake, arrived=arrived or Wake(), max_deliveries=10)
    queue.running = True
    return queue


async def test_with_room_the_message_is_handed_over_claimed(spool: Spool, clock: FakeClock) -> None:
    wake, arrived = Wake(), Wake()
    queue = running(spool, wake, arrived)
    qid = await commit(queue, spool, "bob@example.net")
    assert (wake.count, arrived.count) == (0, 1)
    assert [r.queue_id for r in queue.take_fresh()] == [qid]
    assert queue.message(qid) is not None
    assert await spool.due(clock.now + 1, 10) == []  # claimed: only the scheduler has it


async def test_not_running_commits_plainly_and_wakes_held_mail_wakes_no_one(
    spool: Spool, clock: FakeClock
) -> None:
    wake = Wake()
    queue = ActiveQueue(spool, wake=wake)
    plain = await commit(queue, spool, "bob@example.net")
    assert wake.count == 1 and queue.fresh == []
    queue.running = True
    await commit(queue, spool, "pt@held.example", held=True)  # waits for ETRN: nothing to do
    assert wake.count == 1 and queue.fresh == []
    assert plain in {d.queue_id for d in await spool.due(clock.now + 1, 10)}


async def test_room_is_bounded_by_count(spool: Spool, clock: FakeClock) -> None:
    wake = Wake()
    queue = running(spool, wake)
    assert queue.fresh_limit == 64  # max(64, 2 x max_deliveries)
    for i in range(65):
        await commit(queue, spool, f"r{i}@example.net")
    assert len(queue.messages) == 64 and wake.count == 1  # the 65th went to the queue
    assert len(await spool.due(clock.now + 1, 100)) == 1
    queue.take_fresh()
    queue.drop_dispatched()  # the runner dispatched them: room again
    await commit(queue, spool, "again@example.net")
    assert len(queue.messages) == 1 and wake.count == 1


async def test_room_is_bounded_by_inline_bytes(
    spool: Spool, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(active_module, "FRESH_BYTES", 3 * 1000)
    wake = Wake()
    queue = running(spool, wake)
    for i in range(5):  # each message is 1,004 bytes (trace header + body)
        await commit(queue, spool, f"r{i}@example.net", body=b"x" * 990)
    assert len(queue.messages) == 3 and queue.held_bytes >= 3000 and wake.count == 2


async def test_a_failed_claimed_commit_gives_the_reservation_back(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = running(spool, Wake())
    queue.set_limit(0)

    async def disk_full(*args: object) -> FreshMessage:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(spool, "commit_claimed", disk_full)
        for _ in range(64):
            with pytest.raises(OSError):
                await commit(queue, spool, "bob@example.net")
    await commit(queue, spool, "bob@example.net")  # no reservation leaked: there is room
    assert len(queue.messages) == 1


async def test_give_back_unclaims_and_after_a_stop_nothing_is_kept(
    spool: Spool, clock: FakeClock
) -> None:
    queue = running(spool, Wake())
    qid = await commit(queue, spool, "bob@example.net")
    await queue.give_back()
    assert queue.fresh == [] and queue.messages == {}
    assert [d.queue_id for d in await spool.due(clock.now + 1, 10)] == [qid]
    queue.stopping = True
    late = await commit(queue, spool, "late@example.net")
    await asyncio.sleep(0)
    assert queue.fresh == []
    assert late in {d.queue_id for d in await spool.due(clock.now + 1, 10)}
