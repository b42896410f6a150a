"""Lookups from connect: shared in flight, cached per TTL, bounded by the wait (fake clock
for the cache; a fake resolver that can stall, so no test waits on real DNS)."""

from __future__ import annotations

import asyncio
import time

from tests.fakes import FakeClock

from mailhaven.checks.dnsbl_lookup import FAILURE_TTL, MIN_TTL, DnsblLookup
from mailhaven.net.dnslist import ListAnswer, parse_site

SITES = (parse_site("bl.example"), parse_site("other.example*2"))


class FakeResolver:
    def __init__(self, answers: dict[str, ListAnswer], stall: frozenset[str] = frozenset()) -> None:
        self.answers = answers
        self.stall = stall
        self.asked: list[str] = []

    async def query(self, name: str) -> ListAnswer:
        self.asked.append(name)
        if name in self.stall:
            await asyncio.sleep(3600)
        return self.answers.get(name, ListAnswer((), 300))


async def test_listed_client_scores_and_queries_are_shared() -> None:
    resolver = FakeResolver({"2.0.0.127.bl.example": ListAnswer(("127.0.0.2",), 300)})
    lookup = DnsblLookup(resolver)
    first = lookup.client(SITES, "127.0.0.2")
    second = lookup.client(SITES, "127.0.0.2")  # a second session while the first asks
    a, b = await asyncio.gather(first.score(1.0), second.score(1.0))
    assert a.total == b.total == 1 and a.named == "bl.example"
    assert sorted(resolver.asked) == ["2.0.0.127.bl.example", "2.0.0.127.other.example"]


async def test_cache_keeps_answers_for_their_ttl(clock: FakeClock) -> None:
    resolver = FakeResolver({"2.0.0.127.bl.example": ListAnswer(("127.0.0.2",), 5)})
    lookup = DnsblLookup(resolver, clock=clock)
    await lookup.client(SITES, "127.0.0.2").score(1.0)
    pending = lookup.client(SITES, "127.0.0.2")
    assert pending.ready_score() is not None  # answered from the cache, no waiting
    assert len(resolver.asked) == 2
    clock.now += MIN_TTL + 1  # a TTL of 5 s is kept for MIN_TTL; the other list's 300 s
    await lookup.client(SITES, "127.0.0.2").score(1.0)
    assert resolver.asked[2:] == ["2.0.0.127.bl.example"]


async def test_a_stalled_list_costs_at_most_the_wait_and_lists_nobody() -> None:
    resolver = FakeResolver({"2.0.0.127.other.example": ListAnswer(("127.0.0.2",), 300)},
                            stall=frozenset({"2.0.0.127.bl.example"}))
    lookup = DnsblLookup(resolver)
    pending = lookup.client(SITES, "127.0.0.2")
    started = time.monotonic()
    result = await pending.score(0.3)
    assert time.monotonic() - started < 1.0
    assert result.total == 2 and result.named == "other.example"
    assert pending.unanswered == ("bl.example: no answer in time",)
    # the stalled query goes on for the others (shielded), then is cancelled at the end
    for task in list(lookup._pending.values()):
        task.cancel()


async def test_wait_counts_from_connect(clock: FakeClock) -> None:
    """RCPT TO comes late: the session has already used its wait, so it does not wait again."""
    resolver = FakeResolver({}, stall=frozenset({"2.0.0.127.bl.example"}))
    lookup = DnsblLookup(resolver, clock=clock)
    pending = lookup.client(SITES, "127.0.0.2")
    clock.now += 10
    started = time.monotonic()
    result = await pending.score(5.0)
    assert time.monotonic() - started < 0.5 and result.total == 0
    for task in list(lookup._pending.values()):
        task.cancel()


async def test_failures_are_cached_briefly_and_count_as_unlisted(clock: FakeClock) -> None:
    resolver = FakeResolver({"2.0.0.127.bl.example": ListAnswer(failed="server failure")})
    lookup = DnsblLookup(resolver, clock=clock)
    pending = lookup.client(SITES, "127.0.0.2")
    assert (await pending.score(1.0)).total == 0
    assert "bl.example: server failure" in pending.unanswered
    await lookup.client(SITES, "127.0.0.2").score(1.0)
    assert resolver.asked.count("2.0.0.127.bl.example") == 1
    clock.now += FAILURE_TTL + 1
    await lookup.client(SITES, "127.0.0.2").score(1.0)
    assert resolver.asked.count("2.0.0.127.bl.example") == 2


async def test_a_crashing_resolver_is_a_failure_not_an_exception() -> None:
    class Broken:
        async def query(self, name: str) -> ListAnswer:
            raise RuntimeError("boom")

    pending = DnsblLookup(Broken()).client(SITES, "127.0.0.2")
    assert (await pending.score(1.0)).total == 0
    assert any("boom" in why for why in pending.unanswered)


async def test_cache_is_bounded() -> None:
    lookup = DnsblLookup(FakeResolver({}), cache_size=3)
    for n in range(1, 6):
        await lookup.client(SITES[:1], f"127.0.0.{n}").score(1.0)
    assert len(lookup._cache) == 3


async def test_sender_domain_lists() -> None:
    resolver = FakeResolver({"spam.test.bl.example": ListAnswer(("127.0.1.2",), 300)})
    lookup = DnsblLookup(resolver)
    assert (await lookup.domain(SITES[:1], "spam.test").score(1.0)).named == "bl.example"
    assert (await lookup.domain(SITES[:1], "ham.test").score(1.0)).named is None
    assert (await lookup.domain(SITES[:1], "[192.0.2.1]").score(1.0)).total == 0
