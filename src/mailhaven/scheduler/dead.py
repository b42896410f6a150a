"""The dead-destination cache (Postfix qmgr's "dead" destinations), pure and on an injected clock.

In: `suspend(route, reason, seconds)` when a delivery failed as a whole (`plan.is_site_failure`,
or the agent itself crashed); `forget()` on an operator's flush. Out: `current()`, the routes
suspended now with until when and why, which `plan.make_plan` uses to defer their other due
recipients without spending a delivery slot on them.

Invariants: `current()` never returns a suspension whose time is up (they are dropped as it is
read), and the cache holds at most one suspension per route, so it is bounded by the number of
destinations that failed within `Limits.dead_time`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from mailhaven.proto.replies import Reply
from mailhaven.routing.route import Route
from mailhaven.scheduler.plan import Suspension


class DeadDestinations:
    """Routes that failed as a whole recently, each until a time on `clock`."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._dead: dict[Route, Suspension] = {}

    def suspend(self, route: Route, reason: Reply, seconds: float) -> None:
        """Leave `route` alone for `seconds` from now; `reason` is what its recipients get."""
        self._dead[route] = Suspension(self._clock() + seconds, reason)

    def current(self) -> Mapping[Route, Suspension]:
        """The suspensions still in force (expired ones are dropped)."""
        now = self._clock()
        self._dead = {r: s for r, s in self._dead.items() if s.until > now}
        return self._dead

    def forget(self) -> None:
        """Every destination is tried again at once (Postfix's flush_dead)."""
        self._dead.clear()
