"""Pure policy: backoff timing, plan limits, fairness, outcome judging and log lines."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import pytest

from mailhaven.proto.replies import Reply
from mailhaven.routing.route import Route
from mailhaven.scheduler.backoff import (
    DAY,
    BackoffPolicy,
    delay_warning_due,
    expired,
    next_attempt,
    retry_delay,
)
from mailhaven.scheduler.outcome import attempt_line, judge
from mailhaven.scheduler.plan import Limits, Plan, Suspension, is_site_failure, make_plan
from mailhaven.spool import DueRecipient, Status

P = BackoffPolicy()


def test_backoff_is_time_in_queue_clamped() -> None:
    assert retry_delay(P, arrival=0, now=10) == 300
    assert retry_delay(P, arrival=0, now=1000) == 1000
    assert retry_delay(P, arrival=0, now=100_000) == 4000
    assert next_attempt(P, arrival=0, now=1000) == 2000


def test_expiry_and_bounce_lifetime() -> None:
    policy = BackoffPolicy(lifetime=5 * DAY, bounce_lifetime=1 * DAY)
    assert not expired(policy, 0, 5 * DAY - 1, null_sender=False)
    assert expired(policy, 0, 5 * DAY, null_sender=False)
    assert expired(policy, 0, 1 * DAY, null_sender=True)


def test_delay_warning_is_off_by_default() -> None:
    assert not delay_warning_due(P, 0, 10 * DAY, already_warned=False)
    on = BackoffPolicy(delay_warning=4 * 3600)
    assert delay_warning_due(on, 0, 4 * 3600, already_warned=False)
    assert not delay_warning_due(on, 0, 4 * 3600, already_warned=True)


def test_policy_validation() -> None:
    with pytest.raises(ValueError):
        BackoffPolicy(minimal=0)
    with pytest.raises(ValueError):
        BackoffPolicy(minimal=500, maximal=400)


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


def test_judge_and_log_line() -> None:
    due = [
        DueRecipient("Q", 0, "a@x.example", "list@x.example", 0, 1000.0, 1000.0),
        DueRecipient("Q", 1, "b@x.example", "b@x.example", 0, 1000.0, 1000.0),
        DueRecipient("Q", 2, "c@x.example", "c@x.example", 0, 1000.0, 1000.0),
    ]
    replies = {"a@x.example": Reply(250, "ok", "2.0.0"), "b@x.example": Reply(550, "no", "5.1.1")}
    verdicts = judge(due, replies, policy=P, now=1001.5, null_sender=False, relay="mx[1.2.3.4]")
    assert [v.label for v in verdicts] == ["sent", "bounced", "deferred"]
    assert [v.update.status for v in verdicts] == [Status.SENT, Status.BOUNCED, Status.DEFERRED]
    assert verdicts[2].update.next_attempt == 1301.5
    assert verdicts[2].reply.code == 451  # a missing reply is temporary
    line = attempt_line("Q", verdicts[0], relay="mx[1.2.3.4]", now=1001.5,
                        delays=(0.5, 0.0, 0.0, 1.0))
    assert line == (
        "Q: to=<a@x.example>, orig_to=<list@x.example>, relay=mx[1.2.3.4], delay=1.5,"
        " delays=0.5/0/0/1, dsn=2.0.0, status=sent (ok)"
    )
    late = judge(due[2:], {}, policy=P, now=1000.0 + 5 * DAY, null_sender=False)
    assert late[0].label == "expired" and late[0].update.status is Status.BOUNCED
