"""Planning deliveries: grouping, per-destination and global limits, fairness, held and
suspended routes, site failures."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from mailhaven.proto.replies import Reply
from mailhaven.routing.route import Route
from mailhaven.scheduler.plan import Limits, Plan, Suspension, is_site_failure, make_plan
from mailhaven.spool import DueRecipient


def rcpt(qid: str, index: int, address: str, attempts: int = 0) -> DueRecipient:
    return DueRecipient(qid, index, address, address, attempts, 0.0, 0.0)


def by_domain(address: str) -> Route:
    domain = address.rpartition("@")[2]
    if domain == "held.example":
        return Route("hold", domain)
    if domain == "local.example":
        return Route("local", address.partition("@")[0])
    return Route("relay", domain)


def plan(
    due: list[DueRecipient],
    limits: Limits | None = None,
    *,
    transports: Collection[str] = ("local", "relay"),
    in_flight: Mapping[Route, int] | None = None,
    dead: Mapping[Route, Suspension] | None = None,
) -> Plan:
    return make_plan(
        due, route=by_domain, transports=transports, in_flight=in_flight or {},
        dead=dead or {}, limits=limits or Limits(), now=100.0,
    )


def test_groups_by_message_and_route_and_splits_per_delivery() -> None:
    due = [rcpt("A", i, f"u{i}@big.example") for i in range(5)]
    due += [rcpt("A", 9, "x@other.example"), rcpt("B", 0, "y@big.example")]
    p = plan(due, Limits(per_delivery=2))
    shapes = sorted((d.queue_id, d.route.nexthop, len(d.recipients)) for d in p.deliveries)
    assert shapes == [
        ("A", "big.example", 1), ("A", "big.example", 2), ("A", "big.example", 2),
        ("A", "other.example", 1), ("B", "big.example", 1),
    ]
    assert p.waiting == 0


def test_per_destination_and_global_limits() -> None:
    due = [rcpt(f"M{i}", 0, f"r@dest{i % 2}.example") for i in range(20)]
    p = plan(due, Limits(per_destination=3, max_deliveries=100))
    assert len(p.deliveries) == 6 and p.waiting == 14
    dest0 = Route("relay", "dest0.example")
    p = plan(due, Limits(per_destination=3), in_flight={dest0: 3})
    assert {d.route.nexthop for d in p.deliveries} == {"dest1.example"}
    p = plan(due, Limits(per_destination=20, max_deliveries=4))
    assert len(p.deliveries) == 4 and p.waiting == 16


def test_new_and_deferred_mail_alternate() -> None:
    old = [rcpt(f"OLD{i}", 0, "r@slow.example", attempts=3) for i in range(10)]
    new = [rcpt(f"NEW{i}", 0, "r@slow.example") for i in range(10)]
    p = plan(old + new, Limits(per_destination=4))
    assert [d.queue_id for d in p.deliveries] == ["NEW0", "OLD0", "NEW1", "OLD1"]


def test_hold_unavailable_and_suspended_routes() -> None:
    dead = {Route("relay", "dead.example"): Suspension(200.0, Reply(421, "no", "4.4.1"))}
    over = {Route("relay", "over.example"): Suspension(50.0, Reply(421, "no", "4.4.1"))}
    due = [
        rcpt("A", 0, "a@held.example"),
        rcpt("A", 1, "b@dead.example"),
        rcpt("A", 2, "c@over.example"),
        rcpt("A", 3, "d@local.example"),
    ]
    p = plan(due, transports={"relay"}, dead={**dead, **over})
    assert [r.address for r in p.held] == ["a@held.example"]
    assert [(r.address, s.until) for r, s in p.suspended] == [("b@dead.example", 200.0)]
    assert [r.address for r, _ in p.unavailable] == ["d@local.example"]
    assert [d.route.nexthop for d in p.deliveries] == ["over.example"]  # suspension ended


def test_site_failure_detection() -> None:
    assert is_site_failure({"a": Reply(421, "x", "4.4.1"), "b": Reply(451, "y", "4.4.2")})
    assert not is_site_failure({"a": Reply(452, "mailbox full", "4.2.2")})
    assert not is_site_failure({"a": Reply(421, "x", "4.4.1"), "b": Reply(250, "ok", None)})
    assert not is_site_failure({})
