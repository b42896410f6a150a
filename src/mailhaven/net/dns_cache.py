"""A bounded cache whose entries expire with their DNS TTL (RFC 1035 §3.2.1, RFC 2308 §5).

In: (key, value, ttl) from the resolver facade; out: the value while its TTL lasts, else None.
Used by `net.dns.Resolver.lookup` so that the mail-authentication checks (SPF, DKIM keys,
DMARC policies) of a busy MX ask the DNS once per TTL, not once per message.

Invariants: at most `max_entries` entries (the least recently used goes first); a TTL above
`MAX_TTL` is cut to it (RFC 2181 §8 allows 68 years; we would never refresh); TTL 0 is not
stored at all (RFC 1035: "should not be cached"). Time comes from an injected monotonic clock, so
tests never sleep.

SECURITY: keys and values come from DNS answers for names that senders choose; the size bound
keeps a flood of distinct names from growing memory without limit.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: Longest we keep an answer (one day, what unbound's cache-max-ttl defaults to).
MAX_TTL = 86400
#: Entries kept by default: a few hundred bytes each, so a few MiB at most.
DEFAULT_MAX_ENTRIES = 10000


class TTLCache(Generic[K, V]):
    """An LRU map whose entries expire `ttl` seconds after they were stored."""

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._max = max(1, max_entries)
        self._clock = clock
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        expires, value = entry
        if expires <= self._clock():
            del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: K, value: V, ttl: float) -> None:
        if ttl <= 0:
            self._entries.pop(key, None)
            return
        self._entries[key] = (self._clock() + min(ttl, MAX_TTL), value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
