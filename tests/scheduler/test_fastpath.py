"""The runner's fast path for new mail: offered messages are delivered without queue reads,
bounded in memory, and given back to the spool when the operator or a stop needs them."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from tests.scheduler.test_runner import OK, Agent, always, count_reads, make_runner
from tests.spool.spool_helpers import FakeClock, envelope, put, queued

from mailhaven.scheduler import runner as runner_module
from mailhaven.scheduler.plan import Limits
from mailhaven.scheduler.runner import Runner
from mailhaven.spool import FreshMessage, Hold, Spool, Status


class Counting:
    """The spool, counting the scheduler's calls by name."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        self.calls[name] += 1
        return getattr(self.spool, name)


async def fresh(spool: Spool, *rcpts: str, body: bytes = b"Subject: x\r\n\r\nx\r\n") -> FreshMessage:
    w = spool.new_message()
    w.write(body)
    return await spool.commit_claimed(w, envelope(*rcpts), queued(*rcpts), b"Received: t\r\n")


async def started(runner: Runner) -> asyncio.Task[None]:
    task = asyncio.create_task(runner.run())
    for _ in range(100):
        await asyncio.sleep(0)
        if runner.reserve():
            runner.cancel()
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
        assert runner.reserve()
        runner.offer(await fresh(spool, "r@example.net"))
    await until(lambda: len(agent.calls) == 3 and runner.in_flight == 0, "3 deliveries")
    spent = counting.calls - Counter(before)
    assert spent["due"] == spent["claim"] == spent["load"] == spent["next_due_time"] == 0, spent
    assert spent["record_and_finish"] == 3
    await runner.stop()
    await task
    assert await spool.due(clock.now + 1, 10) == []
    assert await spool.finished() == []  # all three removed


async def test_reservations_are_bounded_by_count_and_bytes(
    spool: Spool, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = make_runner(spool, clock, {"relay": Agent(always(OK), clock, asyncio.Event())},
                         limits=Limits(max_deliveries=10, per_destination=1))
    assert not runner.reserve()  # not running yet: intake commits plainly
    task = await started(runner)
    assert all(runner.reserve() for _ in range(64))  # max(64, 2 x max_deliveries)
    assert not runner.reserve()
    runner.cancel()
    assert runner.reserve()
    for _ in range(64):
        runner.cancel()
    # bytes: offered messages waiting for the one slot count until they are dispatched
    monkeypatch.setattr(runner_module, "FRESH_BYTES", 3 * 1000)
    offered = 0
    while runner.reserve():  # each message is 1,003 bytes (trace header + body)
        runner.offer(await fresh(spool, f"r{offered}@slow.example", body=b"x" * 990))
        offered += 1
        assert offered < 10, "the byte bound never refused"
    # three held reach the bound; a fourth fits if the first was dispatched meanwhile
    assert offered in (3, 4)
    await runner.stop(grace=0)
    await task
    assert not runner.reserve()


async def test_waiting_fresh_mail_stays_claimed_and_an_operator_hold_still_wins(
    spool: Spool, clock: FakeClock
) -> None:
    gate = asyncio.Event()
    agent = Agent(always(OK), clock, gate)
    runner = make_runner(spool, clock, {"relay": agent}, limits=Limits(per_destination=1))
    task = await started(runner)
    first, second = await fresh(spool, "a@slow.example"), await fresh(spool, "b@slow.example")
    for f in (first, second):
        assert runner.reserve()
        runner.offer(f)
    await asyncio.wait_for(agent.started.wait(), 10)
    # the second waits for the one slot, in memory and claimed: no queue read would find it
    assert await spool.due(clock.now + 1, 10) == []
    assert await spool.hold(second.message.queue_id) == 1
    runner.revisit()  # what the control socket does after a hold

    async def given_back() -> bool:
        [state] = await spool.recipients(second.message.queue_id)
        return not state.active

    await until(given_back, "the held message to be given back")
    gate.set()
    await until(lambda: runner.in_flight == 0, "the first delivery")
    await runner.stop()
    await task
    assert [req.queue_id for _, req in agent.calls] == [first.message.queue_id]
    [state] = await spool.recipients(second.message.queue_id)
    assert state.status is Status.PENDING and state.hold & Hold.ADMIN and not state.active


async def test_stop_gives_back_fresh_mail_that_found_no_slot(
    spool: Spool, clock: FakeClock
) -> None:
    agent = Agent(always(OK), clock, gate=asyncio.Event())  # never released
    runner = make_runner(spool, clock, {"relay": agent}, limits=Limits(per_destination=1))
    task = await started(runner)
    offered = [await fresh(spool, f"r{i}@slow.example") for i in range(3)]
    for f in offered:
        assert runner.reserve()
        runner.offer(f)
    await asyncio.wait_for(agent.started.wait(), 10)
    await runner.stop(grace=0)
    await task
    due = await spool.due(clock.now + 1, 10)
    assert sorted(d.queue_id for d in due) == sorted(f.message.queue_id for f in offered)
    late = await fresh(spool, "late@example.net")  # offered after the stop: given back too
    runner.offer(late)
    await until(lambda: len(asyncio.all_tasks()) == 1, "the give-back task")
    assert late.message.queue_id in {d.queue_id for d in await spool.due(clock.now + 1, 10)}


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
