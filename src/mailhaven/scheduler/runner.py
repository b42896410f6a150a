"""The queue manager's loop (Postfix qmgr): wait, plan, dispatch, record, finish.

In: the spool (through the narrow `SchedulerSpool` protocol), the agents per transport name, a
`route(address) -> Route` function, an `on_failures` hook (bounces are someone else's job).
Out: delivery requests to agents, durable per-recipient results, maillog lines.

One task runs `run()`. It wakes when `wake()` is called (intake: new mail; the CLI: requeue),
when a delivery finishes (a slot is free) or when the earliest deferred recipient falls due; it
never polls the queue. It never touches the network itself: all I/O is in agents and the spool.

The backlog (Postfix's active queue, in small): when every usable slot is taken, the due
recipients the plan had to leave are kept in memory, and a freed slot is filled from them without
reading the queue again. The queue is read again when the backlog runs dry, when the next due
time arrives, or on `wake()` - at most every `RESCAN_INTERVAL` while a backlog remains, so a
stream of new mail during a saturated spell costs one bounded read per interval, not one per
message. Scheduling cost per delivery therefore does not grow with the backlog. A recipient
planned from the backlog is claimed only if the spool still finds it attemptable, so an
operator's hold or delete in between wins.

New mail and the backlog are held by the `ActiveQueue` (`scheduler.active`), the seam intake
commits through: the runner takes them into each plan and puts back what found no slot. The
queue is otherwise read only when something may be there that the runner does not hold: after
`wake()`, once the next due time has come, or when the last read was cut at `Limits.scan` and
the backlog ran dry.

Invariants:
- a recipient being attempted is `claim`ed in the spool, so `due()` never returns it twice;
- each reply is recorded durably before the message can be removed; a crash in between means
  the attempt is repeated (at-least-once), never that mail is lost;
- a message with nothing left to do is handed to `on_failures` (with its bounced recipients,
  if any; the hook decides whether to bounce, e.g. never for the null sender, and may read the
  body via the spool before it returns), then removed;
- `stop()` lets deliveries finish until a deadline, then cancels them; cancelled recipients are
  unclaimed and stay pending, as are fresh recipients not yet dispatched.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence

from mailhaven import maillog
from mailhaven.delivery.base import DeliveryAgent, DeliveryRequest
from mailhaven.faults import crash_point
from mailhaven.proto.envelope import Envelope
from mailhaven.proto.replies import Reply
from mailhaven.routing.route import Route
from mailhaven.scheduler.active import ActiveQueue
from mailhaven.scheduler.backoff import BackoffPolicy, delay_warning_due, next_attempt
from mailhaven.scheduler.dead import DeadDestinations
from mailhaven.scheduler.outcome import (
    UNAVAILABLE,
    Verdict,
    attempt_line,
    crash_reply,
    judge,
    relay_without_result,
)
from mailhaven.scheduler.plan import Delivery, Limits, Suspension, is_site_failure, make_plan
from mailhaven.scheduler.ports import OnFailures, SchedulerSpool
from mailhaven.spool.records import (
    DueRecipient,
    Hold,
    RecipientKey,
    RecipientUpdate,
    Status,
    StoredMessage,
)

log = logging.getLogger("mailhaven.queue")

#: seconds before retrying a scheduler pass that failed unexpectedly
ERROR_PAUSE = 10.0
#: while a backlog is kept, the queue is read again at most this often (event-loop seconds)
RESCAN_INTERVAL = 0.05


class Runner:
    def __init__(
        self,
        spool: SchedulerSpool,
        agents: Mapping[str, DeliveryAgent],
        route: Callable[[str], Route],
        *,
        on_failures: OnFailures,
        clock: Callable[[], float] = time.time,
        policy: BackoffPolicy | None = None,
        limits: Limits | None = None,
        on_delay: OnFailures | None = None,
    ) -> None:
        self._spool = spool
        self._agents = dict(agents)
        self._route = route
        self._on_failures = on_failures
        self._on_delay = on_delay
        self._clock = clock
        self._policy = policy or BackoffPolicy()
        self._limits = limits or Limits()
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._busy: Counter[Route] = Counter()
        self._tasks: dict[asyncio.Task[None], Delivery] = {}
        self._dead = DeadDestinations(clock)
        self._stopped = asyncio.Event()
        self._running = False
        self._rescan = True
        self._last_scan = -RESCAN_INTERVAL
        #: the last queue read hit `Limits.scan`: more may be due than the backlog holds
        self._more = False
        #: `next_due_time` must be asked again (a read, a deferral, a wake)
        self._due_changed = True
        self._next_due: float | None = None
        #: new mail (committed through it) and the backlog
        self.active = ActiveQueue(
            spool, wake=self.wake, arrived=self._wakeup.set,
            max_deliveries=self._limits.max_deliveries,
        )
        self._revisit = False

    # -- control --------------------------------------------------------------------------------
    def reconfigure(self, policy: BackoffPolicy, limits: Limits) -> None:
        """New retry policy and concurrency limits (a reload), used from the next plan on;
        deliveries in flight finish under the old ones."""
        self._policy, self._limits = policy, limits
        self.active.set_limit(limits.max_deliveries)
        self.wake()

    def wake(self) -> None:
        """Read the queue again soon (new mail committed without `offer`, a release)."""
        self._rescan = True
        self._due_changed = True
        self._wakeup.set()

    def forget_dead(self) -> None:
        """Forget every dead destination (Postfix's flush_dead: `postqueue -f`, `sendmail -q`,
        ETRN): after an outage the operator's flush must connect now, not log `delivery
        temporarily suspended` until the dead-destination timer runs out."""
        self._dead.forget()

    def flush(self) -> None:
        """`forget_dead`, then read the queue again soon (a flush or an ETRN release)."""
        self.forget_dead()
        self.wake()

    def revisit(self) -> None:
        """The operator changed the queue (hold, delete, requeue): give back the fresh
        recipients held in memory and read the queue again, so the change applies to them."""
        self._revisit = True
        self.wake()

    async def _give_back_fresh(self) -> None:
        await self.active.give_back()
        self._rescan = True

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def run(self) -> None:
        """The loop; returns after `stop()`. An unexpected error in a pass is logged and the
        pass retried after `ERROR_PAUSE` seconds: the daemon keeps running."""
        self._running = self.active.running = True
        try:
            try:
                await self.sweep()
            except Exception:
                log.exception("scheduler: start-up sweep failed")
            while not self._stopping:
                self._wakeup.clear()
                try:
                    wake_at = await self.run_once()
                except Exception:
                    log.exception("scheduler: pass failed; retrying in %.0f s", ERROR_PAUSE)
                    wake_at = self._clock() + ERROR_PAUSE
                if self._stopping:
                    break
                timeout = None if wake_at is None else max(0.0, wake_at - self._clock())
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout)
                except TimeoutError:
                    self._rescan = True  # something fell due
        finally:
            self._stopped.set()

    async def stop(self, grace: float = 10.0) -> None:
        """Stop planning; let deliveries finish for `grace` seconds, then cancel the rest."""
        self._stopping = self.active.stopping = True
        self.wake()
        if self._running:
            await self._stopped.wait()  # no new deliveries after this
        await self._give_back_fresh()
        pending: set[asyncio.Task[None]] = set()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
        if pending:
            keys = [r.key for t in pending for r in self._tasks[t].recipients]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            await self._spool.unclaim(keys)
            log.info("scheduler: stopped with %d delivery(ies) cancelled", len(pending))

    async def settle(self) -> None:
        """Wait until no delivery is in flight (tests, and the end of a flush)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- one pass ------------------------------------------------------------------------------
    async def run_once(self) -> float | None:
        """Plan and dispatch what is due now; returns when to look again (None: on wake only)."""
        now = self._clock()
        if self._revisit:
            self._revisit = False
            await self._give_back_fresh()
        due = await self._due(now)
        fresh = self.active.take_fresh()
        fresh_keys = {r.key for r in fresh}
        candidates = [*due, *fresh]  # the queue's (older) first
        routes, broken = self._routes(candidates)
        plan = make_plan(
            [r for r in candidates if r.address in routes],
            route=routes.__getitem__,
            transports=self._agents.keys(),
            in_flight=self._busy,
            dead=self._dead.current(),
            limits=self._limits,
            now=now,
        )
        self.active.keep(plan.left, fresh_keys)
        await self._defer(broken, now)
        if plan.held:
            await self._spool.hold_recipients([r.key for r in plan.held], Hold.ROUTE)
            for r in plan.held:
                log.info(
                    "%s: to=<%s>, relay=none, status=held (destination on hold)",
                    r.queue_id,
                    r.address,
                )
        await self._defer_unavailable(plan.unavailable, now)
        await self._defer_suspended(plan.suspended, now)
        if plan.deliveries:
            await self._dispatch(plan.deliveries, fresh_keys, now)
        self.active.drop_dispatched()
        if plan.waiting:
            # All usable slots are taken: a finishing delivery wakes us; a pending rescan
            # (new mail meanwhile) must not wait for that longer than the interval.
            return now + RESCAN_INTERVAL if self._rescan else None
        await self._refresh_next_due()
        return self._next_due

    async def _refresh_next_due(self) -> None:
        if self._due_changed:
            self._due_changed = False
            self._next_due = await self._spool.next_due_time()

    async def _dispatch(
        self, deliveries: Sequence[Delivery], fresh: set[RecipientKey], now: float
    ) -> None:
        """Claim what came from the queue (fresh recipients are claimed already), start tasks."""
        wanted = [r.key for d in deliveries for r in d.recipients if r.key not in fresh]
        claimed = set(await self._spool.claim(wanted)) if wanted else set()
        claimed |= fresh
        for d in deliveries:
            d = dataclasses.replace(
                d, recipients=tuple(r for r in d.recipients if r.key in claimed)
            )
            if not d.recipients:
                continue
            self._busy[d.route] += 1
            msg = self.active.message(d.queue_id)
            task = asyncio.create_task(self._deliver(d, now, msg), name=f"deliver {d.queue_id}")
            self._tasks[task] = d
            task.add_done_callback(self._delivery_done)

    async def _due(self, now: float) -> Sequence[DueRecipient]:
        """The candidates of this pass from the queue: a fresh read, or the kept backlog."""
        loop_now = asyncio.get_running_loop().time()
        if not self._rescan and not self.active.backlog:
            # (with a backlog the answer would count the backlog's own recipients as unread)
            await self._refresh_next_due()
        stale = self._rescan or (self._next_due is not None and now >= self._next_due)
        read = stale and (not self.active.backlog or loop_now - self._last_scan >= RESCAN_INTERVAL)
        if not read and not (self._more and not self.active.backlog):
            return self.active.backlog
        self._rescan = False
        self._last_scan = loop_now
        self._due_changed = True
        due = await self._spool.due(now, self._limits.scan)
        new = sum(1 for r in due if r.attempts == 0)
        self._more = max(new, len(due) - new) >= self._limits.scan
        return due

    def _delivery_done(self, task: asyncio.Task[None]) -> None:
        d = self._tasks.pop(task)
        self._busy[d.route] -= 1
        if self._busy[d.route] <= 0:
            del self._busy[d.route]
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: scheduler error: %r", d.queue_id, task.exception())
        self._wakeup.set()  # a slot is free: the backlog may fill it without a rescan

    def _routes(
        self, due: Sequence[DueRecipient]
    ) -> tuple[dict[str, Route], list[tuple[DueRecipient, Reply]]]:
        """Route each address once; a routing error defers that recipient (4.3.0)."""
        routes: dict[str, Route] = {}
        broken: list[tuple[DueRecipient, Reply]] = []
        for rcpt in due:
            if rcpt.address in routes:
                continue
            try:
                routes[rcpt.address] = self._route(rcpt.address)
            except Exception as exc:
                log.exception("%s: routing <%s> failed", rcpt.queue_id, rcpt.address)
                broken.append((rcpt, Reply(451, f"routing failed: {exc}"[:300], "4.3.0")))
        return routes, broken

    async def _defer_unavailable(
        self, items: Sequence[tuple[DueRecipient, Route]], now: float
    ) -> None:
        for rcpt, route in items:
            log.warning("%s: no delivery agent for transport %r", rcpt.queue_id, route.transport)
        await self._defer([(rcpt, UNAVAILABLE) for rcpt, _ in items], now)

    async def _defer(self, items: Sequence[tuple[DueRecipient, Reply]], now: float) -> None:
        """Record a reply for recipients we did not hand to any agent (backoff applies)."""
        by_message: defaultdict[str, list[tuple[DueRecipient, Reply]]] = defaultdict(list)
        for rcpt, r in items:
            by_message[rcpt.queue_id].append((rcpt, r))
        for qid, pairs in by_message.items():
            replies = {rcpt.address: r for rcpt, r in pairs}
            await self._conclude(
                qid,
                [rcpt for rcpt, _ in pairs],
                replies,
                now,
                relay="none",
                planned=now,
                started=now,
                attempted=False,
            )

    async def _defer_suspended(
        self, items: Sequence[tuple[DueRecipient, Suspension]], now: float
    ) -> None:
        by_message: defaultdict[str, list[tuple[DueRecipient, Suspension]]] = defaultdict(list)
        for rcpt, suspension in items:
            by_message[rcpt.queue_id].append((rcpt, suspension))
        for qid, pairs in by_message.items():
            replies = {
                r.address: Reply(
                    s.reason.code,
                    "delivery temporarily suspended: " + " ".join(s.reason.lines),
                    s.reason.enhanced,
                )
                for r, s in pairs
            }
            until = {r.index: s.until for r, s in pairs}
            await self._conclude(
                qid,
                [r for r, _ in pairs],
                replies,
                now,
                relay="none",
                planned=now,
                started=now,
                attempted=False,
                not_before=until,
            )

    # -- one delivery ----------------------------------------------------------------------------
    async def _deliver(self, d: Delivery, planned: float, msg: StoredMessage | None) -> None:
        try:
            await self._attempt(d, planned, msg)
        except Exception as exc:
            # Our own failure (not the agent's): defer with backoff so the recipients neither
            # stay claimed until restart nor come straight back in a tight loop. If even that
            # fails, they stay claimed and the next start-up makes them due again.
            log.exception("%s: scheduler error during delivery", d.queue_id)
            now = self._clock()
            failure = crash_reply(exc)
            updates = [
                RecipientUpdate(
                    r.index,
                    Status.DEFERRED,
                    next_attempt(self._policy, r.arrival, now),
                    failure,
                    attempted=False,
                )
                for r in d.recipients
            ]
            self._due_changed = True
            with contextlib.suppress(Exception):
                await self._spool.record(d.queue_id, updates)

    async def _attempt(self, d: Delivery, planned: float, msg: StoredMessage | None) -> None:
        if msg is None:
            msg = await self._spool.load_to_send(d.queue_id)
        if msg is None:  # deleted or quarantined meanwhile
            await self._spool.unclaim([r.key for r in d.recipients])
            return
        request = DeliveryRequest(
            queue_id=d.queue_id,
            envelope=msg.envelope,
            recipients=tuple(r.address for r in d.recipients),
            route=d.route,
            open_message=msg.open,
            size=msg.size,
        )
        agent = self._agents[d.route.transport]
        started = self._clock()
        replies: Mapping[str, Reply]
        passed: frozenset[str] = frozenset()
        try:
            result = await agent.deliver(request)
            crash_point("delivered")
            replies, relay, passed = result.replies, result.relay_host, result.notify_passed
            crashed = False
        except Exception as exc:  # unknown errors are temporary (ARCHITECTURE, idea 4)
            log.warning("%s: delivery agent %r failed: %r", d.queue_id, d.route.transport, exc)
            failure = crash_reply(exc)
            replies = {r.address: failure for r in d.recipients}
            relay, crashed = relay_without_result(d.route), True
        now = self._clock()
        if crashed or is_site_failure(replies):
            first = next(iter(replies.values()))
            self._dead.suspend(d.route, first, self._limits.dead_time)
        await self._conclude(
            d.queue_id,
            d.recipients,
            replies,
            now,
            relay=relay,
            planned=planned,
            started=started,
            envelope=msg.envelope,
            notify_passed=passed,
        )

    async def _conclude(
        self,
        qid: str,
        rcpts: Sequence[DueRecipient],
        replies: Mapping[str, Reply],
        now: float,
        *,
        relay: str,
        planned: float,
        started: float,
        attempted: bool = True,
        not_before: Mapping[int, float] | None = None,
        envelope: Envelope | None = None,
        notify_passed: frozenset[str] = frozenset(),
    ) -> None:
        """Judge, log, record durably, and finish the message if nothing is left."""
        if envelope is None:
            msg = await self._spool.load(qid)
            null_sender = msg is not None and msg.envelope.sender == ""
            envelope = msg.envelope if msg else None
        else:
            null_sender = envelope.sender == ""
        verdicts = judge(
            rcpts,
            replies,
            policy=self._policy,
            now=now,
            null_sender=null_sender,
            attempted=attempted,
            relay=relay if attempted else None,
            notify_passed=notify_passed,
        )
        if not_before:
            verdicts = [_postpone(v, not_before) for v in verdicts]
        if any(v.label == "deferred" for v in verdicts):
            self._due_changed = True
        delays = (planned - min(r.arrival for r in rcpts), started - planned, 0.0, now - started)
        for v in verdicts:
            maillog.info(log, attempt_line(qid, v, relay=relay, now=now, delays=delays))
        remaining, removed = await self._spool.record_and_finish(qid, [v.update for v in verdicts])
        if any(v.label == "expired" for v in verdicts) and envelope is not None:
            log.info("%s: from=<%s>, status=expired, returned to sender", qid, envelope.sender)
        if removed:
            maillog.info(log, "%s: removed", qid)
        elif remaining == 0:
            await self._finish(qid)
        elif any(v.label == "deferred" for v in verdicts):
            await self._maybe_warn(qid, [v.recipient for v in verdicts], now)

    async def _maybe_warn(self, qid: str, rcpts: Sequence[DueRecipient], now: float) -> None:
        """Postfix's delay_warning_time: tell the sender once that mail is still queued."""
        arrival = min(r.arrival for r in rcpts)
        if self._on_delay is None or not delay_warning_due(
            self._policy, arrival, now, already_warned=False
        ):
            return
        if not await self._spool.mark_warned(qid):
            return
        msg = await self._spool.load(qid)
        if msg is None:
            return
        delayed = [s for s in await self._spool.recipients(qid) if s.status is Status.DEFERRED]
        try:
            await self._on_delay(msg, delayed)
        except Exception:
            log.exception("%s: delay warning hook failed", qid)

    async def _finish(self, qid: str) -> None:
        msg = await self._spool.load(qid)
        if msg is None:
            return
        states = await self._spool.recipients(qid)
        # The hook sees every recipient: bounced ones for failure reports, delivered ones for
        # NOTIFY=SUCCESS reports (RFC 3461 §4.1); it decides who gets told what.
        if any(s.status is Status.BOUNCED or "SUCCESS" in s.notify for s in states):
            try:
                await self._on_failures(msg, states)
            except Exception:
                # Keep the message: the next start-up sweep retries the hook. Never drop
                # a failure report silently.
                log.exception("%s: failure hook failed; message kept", qid)
                return
        await self._spool.remove(qid)
        log.info("%s: removed", qid)

    async def sweep(self) -> None:
        """Finish messages a crash left with nothing to do (between record and remove)."""
        for qid in await self._spool.finished():
            await self._finish(qid)


def _postpone(v: Verdict, not_before: Mapping[int, float]) -> Verdict:
    """A suspended destination's recipients wait until the suspension ends, not the backoff."""
    until = not_before.get(v.recipient.index)
    if until is None or v.update.status is not Status.DEFERRED:
        return v
    return dataclasses.replace(v, update=dataclasses.replace(v.update, next_attempt=until))
