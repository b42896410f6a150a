"""Per-client event rates over a sliding minute (Postfix anvil's connection and message rates).

Pure: the caller passes `now`. Memory is bounded: a client's timestamps are kept only while
they are inside the window, and at most `max_clients` clients are tracked (the stalest go).
"""

from __future__ import annotations

from collections import OrderedDict, deque

WINDOW = 60.0


class RateCounter:
    def __init__(self, limit: int, *, window: float = WINDOW, max_clients: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.max_clients = max_clients
        self._events: OrderedDict[str, deque[float]] = OrderedDict()

    def allow(self, client: str, now: float) -> bool:
        """Count one event for `client`; False when it is over the limit (limit 0: always)."""
        if self.limit <= 0:
            return True
        times = self._events.pop(client, None) or deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        allowed = len(times) < self.limit
        if allowed:
            times.append(now)
        self._events[client] = times
        while len(self._events) > self.max_clients:
            self._events.popitem(last=False)
        return allowed
