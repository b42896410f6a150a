"""The runner against a real spool with a fake clock: nothing here sleeps for timing."""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest
from tests.fakes import FakeClock, put

from mailhaven.delivery.base import DeliveryAgent, DeliveryRequest, DeliveryResult
from mailhaven.proto.replies import Reply
from mailhaven.routing.route import Route
from mailhaven.scheduler.backoff import BackoffPolicy
from mailhaven.scheduler.plan import Limits
from mailhaven.scheduler.runner import Runner
from mailhaven.spool import RecipientState, RecipientUpdate, Spool, Status, StoredMessage

OK = Reply(250, "Ok: queued as XYZ", "2.0.0")
BUSY = Reply(451, "try later", "4.2.0")
NO_USER = Reply(550, "no such user", "5.1.1")


class Agent:
    """Answers from a script; optionally blocks until released; counts concurrency."""

    def __init__(self, answer: Callable[[DeliveryRequest], Mapping[str, Reply] | DeliveryResult],
                 clock: FakeClock, gate: asyncio.Event | None = None) -> None:
        self.answer = answer
        self.clock = clock
        self.gate = gate
        self.calls: list[tuple[float, DeliveryRequest]] = []
        self.active: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.started = asyncio.Event()
        self.changed = asyncio.Condition()

    async def wait_active(self, n: int) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: self.active.total() >= n), 10)

    async def deliver(self, request: DeliveryRequest) -> DeliveryResult:
        self.calls.append((self.clock.now, request))
        nexthop = request.route.nexthop
        self.active[nexthop] += 1
        self.peak[nexthop] = max(self.peak[nexthop], self.active[nexthop])
        self.started.set()
        async with self.changed:
            self.changed.notify_all()
        try:
            if self.gate is not None:
                await self.gate.wait()
            with request.open_message() as f:
                assert f.read().startswith(b"Received:")
            result = self.answer(request)
            if isinstance(result, DeliveryResult):
                return result
            return DeliveryResult(result, "local" if request.route.transport == "local" else "none")
        finally:
            self.active[nexthop] -= 1


def always(r: Reply) -> Callable[[DeliveryRequest], Mapping[str, Reply]]:
    return lambda req: {a: r for a in req.recipients}


def relay_route(address: str) -> Route:
    domain = address.rpartition("@")[2]
    return Route("hold", domain) if domain == "held.example" else Route("relay", domain)


class Failures:
    def __init__(self) -> None:
        self.calls: list[tuple[StoredMessage, Sequence[RecipientState]]] = []

    async def __call__(self, msg: StoredMessage, failed: Sequence[RecipientState]) -> None:
        self.calls.append((msg, failed))


def make_runner(spool: Spool, clock: FakeClock, agents: Mapping[str, DeliveryAgent],
                failures: Failures | None = None, **kw: object) -> Runner:
    return Runner(spool, agents, relay_route, on_failures=failures or Failures(), clock=clock,
                  **kw)  # type: ignore[arg-type]


def count_reads(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record how many recipients each `spool.due()` (a queue read) returned."""
    reads: list[int] = []
    real_due = spool.due

    async def counting_due(now: float, limit: int) -> list[object]:
        found = await real_due(now, limit)
        reads.append(len(found))
        return found  # type: ignore[return-value]

    monkeypatch.setattr(spool, "due", counting_due)
    return reads


async def step(runner: Runner) -> float | None:
    wake_at = await runner.run_once()
    await runner.settle()
    return wake_at


async def test_deferred_recipient_is_retried_on_the_backoff_schedule(
    spool: Spool, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    answers = iter([BUSY, BUSY, OK])
    agent = Agent(lambda req: {req.recipients[0]: next(answers)}, clock)
    runner = make_runner(spool, clock, {"relay": agent})
    qid = await put(spool, b"hello", "bob@example.net")
    caplog.set_level("INFO", logger="mailhaven.queue")

    await step(runner)
    assert await spool.next_due_time() == 1300.0  # 0 s in queue -> minimal backoff 300 s
    clock.now = 1299.0
    await step(runner)
    assert len(agent.calls) == 1
    clock.now = 1300.0
    await step(runner)
    assert await spool.next_due_time() == 1600.0  # 300 s in queue -> 300 s
    [state] = await spool.recipients(qid)
    assert state.attempts == 2 and state.last_reply == BUSY
    clock.now = 1600.0
    await step(runner)
    assert [t for t, _ in agent.calls] == [1000.0, 1300.0, 1600.0]
    assert await spool.load(qid) is None
    assert f"{qid}: to=<bob@example.net>, relay=none, delay=600" in caplog.text
    assert "dsn=2.0.0, status=sent (Ok: queued as XYZ)" in caplog.text
    assert "dsn=4.2.0, status=deferred (try later)" in caplog.text
    assert caplog.messages[-1] == f"{qid}: removed"


async def test_message_expires_after_its_lifetime(
    spool: Spool, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    agent = Agent(always(BUSY), clock)
    failures = Failures()
    runner = make_runner(spool, clock, {"relay": agent}, failures,
                         policy=BackoffPolicy(lifetime=1000.0))
    qid = await put(spool, b"hello", "bob@example.net")
    caplog.set_level("INFO", logger="mailhaven.queue")
    for _ in range(10):
        await step(runner)
        wake_at = await spool.next_due_time()
        if wake_at is None:
            break
        clock.now = wake_at
    assert [t for t, _ in agent.calls] == [1000.0, 1300.0, 1600.0, 2200.0]
    [(msg, failed)] = failures.calls
    assert msg.queue_id == qid and msg.envelope.sender == "alice@example.org"
    assert [(f.address, f.status, f.last_reply) for f in failed] == [
        ("bob@example.net", Status.BOUNCED, BUSY)
    ]
    assert f"{qid}: from=<alice@example.org>, status=expired, returned to sender" in caplog.text
    assert await spool.load(qid) is None


async def test_permanent_failure_goes_to_the_hook_even_for_null_sender(
    spool: Spool, clock: FakeClock
) -> None:
    agent = Agent(lambda req: {"a@x.example": OK, "b@x.example": NO_USER}, clock)
    failures = Failures()
    runner = make_runner(spool, clock, {"relay": agent}, failures)
    qid = await put(spool, b"bounce", "a@x.example", "b@x.example", sender="")
    await step(runner)
    [(msg, states)] = failures.calls
    # The hook sees every recipient and picks the bounced ones itself.
    failed = [s.address for s in states if s.status is Status.BOUNCED]
    assert msg.envelope.sender == "" and failed == ["b@x.example"]
    assert len(agent.calls) == 1 and agent.calls[0][1].recipients == ("a@x.example", "b@x.example")
    assert await spool.load(qid) is None


async def test_failure_hook_error_keeps_the_message(spool: Spool, clock: FakeClock) -> None:
    async def broken(msg: StoredMessage, failed: Sequence[RecipientState]) -> None:
        raise RuntimeError("bounce queue full")

    runner = Runner(spool, {"relay": Agent(always(NO_USER), clock)}, relay_route,
                    on_failures=broken, clock=clock)
    qid = await put(spool, b"x")
    await step(runner)
    assert await spool.load(qid) is not None
    assert await spool.finished() == [qid]  # the start-up sweep will try again


async def test_per_destination_concurrency_is_respected(spool: Spool, clock: FakeClock) -> None:
    gate = asyncio.Event()
    agent = Agent(always(OK), clock, gate)
    runner = make_runner(spool, clock, {"relay": agent}, limits=Limits(per_destination=3))
    for i in range(10):
        await put(spool, b"m%d" % i, "r@slow.example")
    for i in range(2):
        await put(spool, b"f%d" % i, "r@fast.example")
    assert await runner.run_once() is None  # slots full: wait for a wake, do not spin
    assert runner.in_flight == 5
    await agent.wait_active(5)
    assert dict(agent.active) == {"slow.example": 3, "fast.example": 2}
    gate.set()
    for _ in range(10):
        await runner.settle()
        await runner.run_once()
        if runner.in_flight == 0:
            break
    assert len(agent.calls) == 12 and agent.peak["slow.example"] == 3
    assert await spool.due(clock.now, 100) == []


async def test_run_wakes_on_new_mail_and_stops(spool: Spool, clock: FakeClock) -> None:
    agent = Agent(always(OK), clock)
    runner = make_runner(spool, clock, {"relay": agent})
    task = asyncio.create_task(runner.run())
    await asyncio.sleep(0)
    qid = await put(spool, b"new", "r@example.net")
    runner.wake()
    await asyncio.wait_for(agent.started.wait(), 10)
    await runner.stop(grace=10)
    await asyncio.wait_for(task, 10)
    assert agent.calls[0][1].queue_id == qid


async def test_stop_cancels_late_deliveries_and_keeps_them_pending(
    spool: Spool, clock: FakeClock
) -> None:
    agent = Agent(always(OK), clock, gate=asyncio.Event())  # never released
    runner = make_runner(spool, clock, {"relay": agent})
    task = asyncio.create_task(runner.run())
    qid = await put(spool, b"slow", "r@example.net")
    runner.wake()
    await asyncio.wait_for(agent.started.wait(), 10)
    await runner.stop(grace=0)
    await asyncio.wait_for(task, 10)
    [state] = await spool.recipients(qid)
    assert state.status is Status.PENDING and not state.active and state.attempts == 0
    assert [d.queue_id for d in await spool.due(clock.now, 10)] == [qid]


async def test_missing_transport_defers_without_spinning(spool: Spool, clock: FakeClock) -> None:
    local = Agent(always(OK), clock)
    runner = make_runner(spool, clock, {"local": local})  # no "relay" agent yet
    qid = await put(spool, b"x", "r@remote.example")
    wake_at = await step(runner)
    assert wake_at == 1300.0  # next look is the backoff time, not "now"
    [state] = await spool.recipients(qid)
    assert state.status is Status.DEFERRED and state.next_attempt == 1300.0
    assert state.last_reply is not None and "mail transport unavailable" in state.last_reply.text
    assert await step(runner) == 1300.0 and local.calls == []


async def test_agent_exception_defers_and_suspends_the_destination(
    spool: Spool, clock: FakeClock
) -> None:
    def explode(req: DeliveryRequest) -> Mapping[str, Reply]:
        raise ConnectionResetError("peer went away")

    agent = Agent(explode, clock)
    runner = make_runner(spool, clock, {"relay": agent},
                         limits=Limits(per_destination=1, dead_time=600.0))
    first = await put(spool, b"1", "r@dead.example")
    second = await put(spool, b"2", "s@dead.example")
    await step(runner)  # only `first` fits the one slot
    [s1] = await spool.recipients(first)
    assert s1.status is Status.DEFERRED and s1.last_reply is not None
    assert s1.last_reply.code == 451 and "ConnectionResetError" in s1.last_reply.text
    await step(runner)  # `second` meets the dead-destination cache, not the agent
    assert len(agent.calls) == 1
    [s2] = await spool.recipients(second)
    assert s2.status is Status.DEFERRED and s2.attempts == 0 and s2.next_attempt == 1600.0
    assert s2.last_reply is not None and "temporarily suspended" in s2.last_reply.text


async def test_flush_forgets_the_dead_destination(spool: Spool, clock: FakeClock) -> None:
    """After an outage, a flush (the requeue plus `Runner.flush`) reaches the agent at once
    instead of meeting the dead-destination cache until `dead_time` runs out."""
    down = True

    def answer(req: DeliveryRequest) -> Mapping[str, Reply]:
        if down:
            raise ConnectionRefusedError("connection refused")
        return always(Reply(250, "ok", "2.0.0"))(req)

    agent = Agent(answer, clock)
    runner = make_runner(spool, clock, {"relay": agent}, limits=Limits(dead_time=600.0))
    qid = await put(spool, b"1", "r@dead.example")
    await step(runner)
    down = False
    clock.now += 10
    assert await spool.requeue(None) == 1
    runner.flush()
    await step(runner)
    assert len(agent.calls) == 2
    assert await spool.recipients(qid) == [] or all(
        s.status is Status.SENT for s in await spool.recipients(qid)
    )


async def test_hold_route_is_stored_held_and_not_attempted(
    spool: Spool, clock: FakeClock
) -> None:
    agent = Agent(always(OK), clock)
    runner = make_runner(spool, clock, {"relay": agent})
    qid = await put(spool, b"x", "r@held.example", "s@open.example")
    assert await step(runner) is None
    [held, sent] = await spool.recipients(qid)
    assert held.hold and held.status is Status.PENDING
    assert sent.status is Status.SENT
    assert [req.recipients for _, req in agent.calls] == [("s@open.example",)]
    assert await spool.load(qid) is not None  # kept until the held recipient is delivered


async def test_relay_name_reported_by_the_agent_is_logged(
    spool: Spool, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    relay = "mx.example.net[192.0.2.1]:25"
    agent = Agent(lambda req: DeliveryResult({a: OK for a in req.recipients}, relay), clock)
    runner = make_runner(spool, clock, {"relay": agent})
    caplog.set_level("INFO", logger="mailhaven.queue")
    await put(spool, b"x", "r@example.net")
    await step(runner)
    assert "relay=mx.example.net[192.0.2.1]:25," in caplog.text


async def test_sweep_finishes_what_a_crash_left_behind(spool: Spool, clock: FakeClock) -> None:
    qid = await put(spool, b"x")
    await spool.record(qid, [RecipientUpdate(0, Status.SENT, None, OK)])
    runner = make_runner(spool, clock, {})
    await runner.sweep()
    assert await spool.load(qid) is None


async def test_delay_warning_is_sent_once(spool: Spool, clock: FakeClock) -> None:
    warnings = Failures()
    runner = Runner(spool, {"relay": Agent(always(BUSY), clock)}, relay_route,
                    on_failures=Failures(), on_delay=warnings, clock=clock,
                    policy=BackoffPolicy(delay_warning=500.0))
    qid = await put(spool, b"x", "r@example.net")
    for _ in range(4):  # attempts at 1000, 1300, 1600, 2200
        await step(runner)
        wake_at = await spool.next_due_time()
        assert wake_at is not None
        clock.now = wake_at
    [(msg, delayed)] = warnings.calls
    assert msg.queue_id == qid
    assert [(d.address, d.status, d.attempts) for d in delayed] == [
        ("r@example.net", Status.DEFERRED, 3)
    ]


async def test_scheduler_error_defers_instead_of_sticking(tmp_path: Path, clock: FakeClock) -> None:
    class FlakySpool(Spool):
        broken = True

        async def load(self, queue_id: str) -> StoredMessage | None:
            if self.broken:
                self.broken = False
                raise sqlite3.OperationalError("disk I/O error")
            return await super().load(queue_id)

    spool = FlakySpool(tmp_path / "q", clock=clock)
    spool.open()
    try:
        agent = Agent(always(OK), clock)
        runner = make_runner(spool, clock, {"relay": agent})
        qid = await put(spool, b"x", "r@example.net")
        await step(runner)
        [state] = await spool.recipients(qid)
        assert state.status is Status.DEFERRED and not state.active
        assert state.next_attempt == 1300.0 and agent.calls == []
        clock.now = 1300.0
        await step(runner)
        assert await spool.load(qid) is None and len(agent.calls) == 1
    finally:
        spool.close()


async def test_freed_slots_are_filled_from_the_backlog_without_rereading_the_queue(
    spool: Spool, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Postfix's active queue in small: a finished delivery takes the next recipient from the
    plan's leftovers; the queue is read again only on wake(), when something falls due, or
    when the last read was cut at the scan limit."""
    reads = count_reads(spool, monkeypatch)
    gate = asyncio.Event()
    agent = Agent(always(OK), clock, gate)
    runner = make_runner(spool, clock, {"relay": agent}, limits=Limits(per_destination=2))
    qids = [await put(spool, b"m%d" % i, "r@slow.example") for i in range(6)]
    assert await runner.run_once() is None and reads == [6]
    # an operator holds a message that waits in the backlog: the hold wins over the plan
    await spool.hold(qids[5])
    gate.set()
    for _ in range(10):
        await runner.settle()
        await runner.run_once()
        if runner.in_flight == 0 and len(agent.calls) >= 5:
            break
    delivered = [req.queue_id for _, req in agent.calls]
    assert sorted(delivered) == sorted(qids[:5])
    # one read for the six, none while the backlog lasted, none once it ran dry (that read
    # was not cut at Limits.scan, so the queue holds nothing the runner has not seen)
    assert reads == [6], reads


async def test_wake_makes_the_next_pass_read_the_queue(spool: Spool, clock: FakeClock) -> None:
    agent = Agent(always(OK), clock)
    runner = make_runner(spool, clock, {"relay": agent})
    await step(runner)
    qid = await put(spool, b"late", "r@example.net")
    runner.wake()
    await step(runner)
    assert [req.queue_id for _, req in agent.calls] == [qid]
