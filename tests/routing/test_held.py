"""ETRN (RFC 1985) replies and release windows."""

from __future__ import annotations

from tests.fakes import FakeClock

from mailhaven.routing.held import RELEASE_WINDOW, PartTimeHosts
from mailhaven.routing.route import Route


def hosts(
    released: list[str], counts: dict[str, int], clock: FakeClock, woken: list[int]
) -> PartTimeHosts:
    async def release(domain: str) -> int:
        released.append(domain)
        return counts.get(domain, 0)

    return PartTimeHosts(
        held_domains=["parttime.example", "a.branch.example", "b.branch.example"],
        clients=["127.0.0.0/8"],
        release=release,
        wake=lambda: woken.append(1),
        clock=clock,
    )


async def test_etrn_replies() -> None:
    released: list[str] = []
    woken: list[int] = []
    clock = FakeClock()
    h = hosts(released, {"parttime.example": 3}, clock, woken)
    r = await h.etrn("127.0.0.1", "parttime.example")
    assert (r.code, r.text) == (253, "OK, 3 pending messages for node parttime.example started")
    assert (await h.etrn("127.0.0.1", "@branch.example")).code == 251
    assert sorted(released) == ["a.branch.example", "b.branch.example", "parttime.example"]
    assert (await h.etrn("192.0.2.1", "parttime.example")).code == 459
    assert (await h.etrn("127.0.0.1", "other.example")).code == 459
    assert (await h.etrn("127.0.0.1", "#queue")).code == 458
    assert woken


async def test_release_window_routes_held_domain_normally() -> None:
    clock = FakeClock()
    h = hosts([], {}, clock, [])

    def inner(address: str) -> Route:
        return Route("hold", address.rpartition("@")[2])

    route = h.route(inner, lambda domain: Route("relay", f"[127.0.0.9]:{len(domain)}"))
    assert route("x@parttime.example").transport == "hold"
    await h.release(["parttime.example"])
    assert route("x@parttime.example") == Route("relay", "[127.0.0.9]:16")
    clock.now += RELEASE_WINDOW + 1
    assert route("x@parttime.example").transport == "hold"


async def test_the_daemon_counts_the_messages_released_in_the_workers_shards() -> None:
    asked: list[list[str]] = []

    async def release(domain: str) -> int:
        return 1

    async def elsewhere(domains: object) -> int:
        assert isinstance(domains, list)
        asked.append(domains)
        return 2

    h = PartTimeHosts(held_domains=["a.example", "b.example"], clients=["127.0.0.0/8"],
                      release=release, wake=lambda: None, elsewhere=elsewhere)
    r = await h.etrn("127.0.0.1", "@example")
    assert (r.code, r.text) == (253, "OK, 4 pending messages for node @example started")
    assert asked == [["a.example", "b.example"]]
