"""The runner with its active queue: mail committed through it is delivered without queue
reads, and given back to the spool when the operator or a stop needs it (the active queue's own
bounds: test_active.py)."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from tests.fakes import FakeClock, envelope, put, queued
from tests.scheduler.test_runner import OK, Agent, always, count_reads, make_runner

from mailhaven.scheduler.plan import Limits
from mailhaven.scheduler.runner import Runner
from mailhaven.spool import Hold, Spool, Status


class Counting:
    """The spool, counting the scheduler's calls by name."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        self.calls[name] += 1
        return getattr(self.spool, name)


async def commit(runner: Runner, spool: Spool, *rcpts: str) -> str:
    """What intake does: commit a new message through the runner's active queue."""
    w = spool.new_message()
    w.write(b"Subject: x\r\n\r\nx\r\n")
    await runner.active.commit(
        w, envelope(*rcpts), queued(*rcpts), b"Received: t\r\n", attemptable=True
    )
    return w.queue_id


async def started(runner: Runner) -> asyncio.Task[None]:
    task = asyncio.create_task(runner.run())
    for _ in range(100):
        await asyncio.sleep(0)
        if runner.active.running:
            return task
    raise AssertionError("runner did not start")


async def until(check: Any, what: str) -> None:
    for _ in range(1000):
        if await check() if asyncio.iscoroutinefunction(check) else check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


async def test_an_offered_message_is_delivered_without_reading_the_queue(
    spool: Spool, clock: FakeClock
) -> None:
    counting = Counting(spool)
    agent = Agent(always(OK), clock)
    runner = make_runner(counting, clock, {"relay": agent})  # type: ignore[arg-type]
    task = await started(runner)
    await until(lambda: counting.calls["next_due_time"] == 1, "the start-up pass")
    before = dict(counting.calls)
    for _ in range(3):
        await commit(runner, spool, "r@example.net")
    await until(lambda: len(agent.calls) == 3 and runner.in_flight == 0, "3 deliveries")
    spent = counting.calls - Counter(before)
    assert spent["due"] == spent["claim"] == spent["load"] == spent["next_due_time"] == 0, spent
    assert spent["record_and_finish"] == 3
    await runner.stop()
    await task
    assert await spool.due(clock.now + 1, 10) == []
    assert await spool.finished() == []  # all three removed


async def test_waiting_fresh_mail_stays_claimed_and_an_operator_hold_still_wins(
    spool: Spool, clock: FakeClock
) -> None:
    gate = asyncio.Event()
    agent = Agent(always(OK), clock, gate)
    runner = make_runner(spool, clock, {"relay": agent}, limits=Limits(per_destination=1))
    task = await started(runner)
    first = await commit(runner, spool, "a@slow.example")
    second = await commit(runner, spool, "b@slow.example")
    await asyncio.wait_for(agent.started.wait(), 10)
    # the second waits for the one slot, in memory and claimed: no queue read would find it
    assert await spool.due(clock.now + 1, 10) == []
    assert await spool.hold(second) == 1
    runner.revisit()  # what the control socket does after a hold

    async def given_back() -> bool:
        [state] = await spool.recipients(second)
        return not state.active

    await until(given_back, "the held message to be given back")
    gate.set()
    await until(lambda: runner.in_flight == 0, "the first delivery")
    await runner.stop()
    await task
    assert [req.queue_id for _, req in agent.calls] == [first]
    [state] = await spool.recipients(second)
    assert state.status is Status.PENDING and state.hold & Hold.ADMIN and not state.active


async def test_stop_gives_back_fresh_mail_that_found_no_slot(
    spool: Spool, clock: FakeClock
) -> None:
    agent = Agent(always(OK), clock, gate=asyncio.Event())  # never released
    runner = make_runner(spool, clock, {"relay": agent}, limits=Limits(per_destination=1))
    task = await started(runner)
    offered = [await commit(runner, spool, f"r{i}@slow.example") for i in range(3)]
    await asyncio.wait_for(agent.started.wait(), 10)
    await runner.stop(grace=0)
    await task
    due = await spool.due(clock.now + 1, 10)
    assert sorted(d.queue_id for d in due) == sorted(offered)
    late = await commit(runner, spool, "late@example.net")  # after the stop: plainly queued
    assert late in {d.queue_id for d in await spool.due(clock.now + 1, 10)}


async def test_a_read_cut_at_the_scan_limit_is_continued_when_the_backlog_runs_dry(
    spool: Spool, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = count_reads(spool, monkeypatch)
    agent = Agent(always(OK), clock)
    runner = make_runner(spool, clock, {"relay": agent}, limits=Limits(scan=2))
    qids = [await put(spool, b"m%d" % i, "r@example.net") for i in range(5)]
    for _ in range(10):
        await runner.run_once()
        await runner.settle()
    assert sorted(req.queue_id for _, req in agent.calls) == sorted(qids)
    assert reads[:3] == [2, 2, 1], reads  # then no read: the last one was not cut
    assert len(reads) == 3
