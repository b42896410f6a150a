"""The scheduling plan: which due recipients to attempt now, grouped how (pure).

In: due recipients (from the spool), a `route(address) -> Route` function, the transports that
have an agent, what is already in flight per destination, the dead-destination cache and limits.
Out: a `Plan`: deliveries to start (one message, one route, up to `per_delivery` recipients
each), recipients to hold, recipients whose transport has no agent, recipients whose destination
is suspended; whatever does not fit the concurrency limits is simply left for a later pass.

Rules (Postfix qmgr's, simplified):
- a destination is a `Route` (transport + next hop); at most `per_destination` deliveries to one
  destination and `max_deliveries` overall are in flight;
- fairness: new mail and retries are taken alternately, so a backlog of deferred mail cannot
  starve fresh mail and vice versa;
- a destination that just failed as a whole (`is_site_failure`) is suspended until
  `now + dead_time`: its other due recipients are deferred to then without using a slot, so one
  dead MX cannot eat every slot.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import zip_longest

from mailhaven.proto.replies import Reply
from mailhaven.routing.route import Route
from mailhaven.spool.records import DueRecipient


@dataclass(frozen=True, slots=True)
class Limits:
    #: deliveries in flight overall (Postfix default_process_limit = 100)
    max_deliveries: int = 100
    #: deliveries in flight per destination (default_destination_concurrency_limit = 20)
    per_destination: int = 20
    #: recipients per delivery (default_destination_recipient_limit = 50)
    per_delivery: int = 50
    #: how long a destination that failed as a whole is left alone; Postfix's qmgr unthrottles
    #: a dead destination after minimal_backoff_time, and app.py passes that value
    dead_time: float = 300.0
    #: how many due recipients of each kind (new, retry) one pass looks at
    scan: int = 1000


@dataclass(frozen=True, slots=True)
class Suspension:
    until: float
    reason: Reply


@dataclass(frozen=True, slots=True)
class Delivery:
    queue_id: str
    route: Route
    recipients: tuple[DueRecipient, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    deliveries: tuple[Delivery, ...] = ()
    held: tuple[DueRecipient, ...] = ()
    unavailable: tuple[tuple[DueRecipient, Route], ...] = ()
    suspended: tuple[tuple[DueRecipient, Suspension], ...] = ()
    #: due recipients left for a later pass because every usable slot is taken, in plan order
    left: tuple[DueRecipient, ...] = ()

    @property
    def waiting(self) -> int:
        return len(self.left)


def interleave(due: Sequence[DueRecipient]) -> Iterator[DueRecipient]:
    """New and retried recipients alternately, each kind in the order given (oldest first)."""
    new = [r for r in due if r.attempts == 0]
    old = [r for r in due if r.attempts > 0]
    for a, b in zip_longest(new, old):
        if a is not None:
            yield a
        if b is not None:
            yield b


@dataclass
class _Builder:
    limits: Limits
    in_flight: int
    busy: dict[Route, int]
    open: dict[tuple[str, Route], list[DueRecipient]] = field(default_factory=dict)
    order: list[tuple[str, Route]] = field(default_factory=list)
    done: list[Delivery] = field(default_factory=list)

    def add(self, rcpt: DueRecipient, route: Route) -> bool:
        key = (rcpt.queue_id, route)
        group = self.open.get(key)
        if group is not None and len(group) < self.limits.per_delivery:
            group.append(rcpt)
            return True
        if self.in_flight >= self.limits.max_deliveries:
            return False
        if self.busy.get(route, 0) >= self.limits.per_destination:
            return False
        if group is not None:  # full: close it, start another
            self.done.append(Delivery(rcpt.queue_id, route, tuple(group)))
        self.in_flight += 1
        self.busy[route] = self.busy.get(route, 0) + 1
        self.open[key] = [rcpt]
        if group is None:
            self.order.append(key)
        return True

    def deliveries(self) -> tuple[Delivery, ...]:
        last = [Delivery(q, r, tuple(self.open[(q, r)])) for q, r in self.order]
        return (*self.done, *last)


def make_plan(
    due: Sequence[DueRecipient],
    *,
    route: Callable[[str], Route],
    transports: Collection[str],
    in_flight: Mapping[Route, int],
    dead: Mapping[Route, Suspension],
    limits: Limits,
    now: float,
) -> Plan:
    builder = _Builder(limits, sum(in_flight.values()), dict(in_flight))
    held: list[DueRecipient] = []
    unavailable: list[tuple[DueRecipient, Route]] = []
    suspended: list[tuple[DueRecipient, Suspension]] = []
    left: list[DueRecipient] = []
    for rcpt in interleave(due):
        r = route(rcpt.address)
        suspension = dead.get(r)
        if r.transport == "hold":
            held.append(rcpt)
        elif r.transport not in transports:
            unavailable.append((rcpt, r))
        elif suspension is not None and suspension.until > now:
            suspended.append((rcpt, suspension))
        elif not builder.add(rcpt, r):
            left.append(rcpt)
    return Plan(
        builder.deliveries(), tuple(held), tuple(unavailable), tuple(suspended), tuple(left)
    )


def is_site_failure(replies: Mapping[str, Reply]) -> bool:
    """Did the destination fail as a whole (not one mailbox)? Every reply temporary and in the
    RFC 3463 network/routing class 4.4.x (no answer, connection dropped, DNS failure...)."""
    return bool(replies) and all(
        r.is_temporary and (r.enhanced or "").startswith("4.4.") for r in replies.values()
    )
