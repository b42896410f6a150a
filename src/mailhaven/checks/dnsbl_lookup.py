"""DNS list lookups for sessions: started in parallel at connect, shared, cached, bounded.

In: the sites (`checks.dnsbl.Site`) and a client address or a sender domain. Out: a `Pending`
per session whose `score(wait)` gives the `checks.dnsbl.Score` after at most `wait` seconds,
counting every list that has not answered by then (timeout, SERVFAIL) as "not listed": a slow
or dead list never delays a session past its wait and never rejects anybody.

Caching: each query name's answer is kept for its TTL (at least MIN_TTL, at most MAX_TTL), in at
most `cache_size` names (least recently used out first); a failed lookup is kept FAILURE_TTL so
a dead list is not asked again by every session; concurrent sessions share one query in flight.
Each query is a task of its own, so a session that goes away does not cancel the others'.

SECURITY: query names are built by `checks.dnsbl` (client addresses, validated domains).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol

from mailhaven.checks.dnsbl import Score, score
from mailhaven.net.dnslist import ListAnswer, Site, client_query, domain_query

log = logging.getLogger("mailhaven.checks")

#: postscreen_dnsbl_min_ttl = 60 s, postscreen_dnsbl_max_ttl = 1 h.
MIN_TTL = 60.0
MAX_TTL = 3600.0
#: How long a timeout or SERVFAIL is remembered.
FAILURE_TTL = 30.0
CACHE_SIZE = 50_000


class Querier(Protocol):
    async def query(self, name: str) -> ListAnswer: ...


class DnsblLookup:
    """One per service: the cache and the queries in flight (see the module docstring)."""

    def __init__(
        self,
        resolver: Querier,
        *,
        cache_size: int = CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.resolver = resolver
        self._clock = clock
        self._cache_size = cache_size
        self._cache: OrderedDict[str, tuple[float, ListAnswer]] = OrderedDict()
        self._pending: dict[str, asyncio.Future[ListAnswer]] = {}

    def client(self, sites: Sequence[Site], address: str) -> Pending:
        """Start the lookups of `address` in every site's zone."""
        names = {s.zone: client_query(address, s.zone) for s in sites}
        return self._start(sites, names)

    def domain(self, sites: Sequence[Site], domain: str) -> Pending:
        """Start the lookups of `domain` in every right-hand-side site's zone."""
        names = {s.zone: domain_query(domain, s.zone) for s in sites}
        return self._start(sites, names)

    def _start(self, sites: Sequence[Site], names: dict[str, str | None]) -> Pending:
        started = self._clock()
        futures = {zone: self._future(name) for zone, name in names.items() if name is not None}
        return Pending(sites, futures, started, self._clock)

    def _future(self, name: str) -> asyncio.Future[ListAnswer]:
        now = self._clock()
        cached = self._cache.get(name)
        if cached is not None:
            if cached[0] > now:
                self._cache.move_to_end(name)
                done: asyncio.Future[ListAnswer] = asyncio.get_running_loop().create_future()
                done.set_result(cached[1])
                return done
            del self._cache[name]
        task = self._pending.get(name)
        if task is None:
            task = self._pending[name] = asyncio.ensure_future(self._ask(name))
            task.add_done_callback(lambda t: self._settle(name, t))
        return task

    async def _ask(self, name: str) -> ListAnswer:
        try:
            return await self.resolver.query(name)
        except Exception as err:  # a bug in the resolver must not cost a session anything
            log.warning("DNS list query %s failed: %s", name, err)
            return ListAnswer(failed=str(err))

    def _settle(self, name: str, task: asyncio.Future[ListAnswer]) -> None:
        self._pending.pop(name, None)
        if task.cancelled():
            return
        answer = task.result()
        ttl = FAILURE_TTL if answer.failed else min(max(float(answer.ttl), MIN_TTL), MAX_TTL)
        self._cache[name] = (self._clock() + ttl, answer)
        self._cache.move_to_end(name)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


class Pending:
    """One session's lookups: `score` waits for them, once, for what is left of `wait`."""

    def __init__(
        self,
        sites: Sequence[Site],
        futures: dict[str, asyncio.Future[ListAnswer]],
        started: float,
        clock: Callable[[], float],
    ) -> None:
        self.sites = sites
        self.futures = futures
        self.started = started
        self._clock = clock
        self._score: Score | None = None
        #: zones without an answer when the score was made (late or failed), for the log
        self.unanswered: tuple[str, ...] = ()

    @property
    def done(self) -> bool:
        return self._score is not None or all(f.done() for f in self.futures.values())

    def ready_score(self) -> Score | None:
        """The score without waiting, when every lookup has finished (the fast path)."""
        if self._score is None and all(f.done() for f in self.futures.values()):
            self._finish()
        return self._score

    async def score(self, wait: float) -> Score:
        if self._score is None:
            left = self.started + wait - self._clock()
            waiting = [f for f in self.futures.values() if not f.done()]
            if waiting and left > 0:
                # shielded by asyncio.wait itself: the shared lookups go on after a timeout
                await asyncio.wait(waiting, timeout=left)
            self._finish()
        assert self._score is not None
        return self._score

    def _finish(self) -> None:
        answers: dict[str, tuple[str, ...]] = {}
        missing = []
        for zone, future in self.futures.items():
            if not future.done() or future.cancelled():
                missing.append(f"{zone}: no answer in time")
                continue
            answer = future.result()
            if answer.failed:
                missing.append(f"{zone}: {answer.failed}")
            else:
                answers[zone] = answer.addresses
        self.unanswered = tuple(missing)
        self._score = score(self.sites, answers)
