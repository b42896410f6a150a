"""The dead-destination cache: a suspension lasts its time, per route, until a flush."""

from __future__ import annotations

from tests.fakes import FakeClock

from mailhaven.proto.replies import Reply
from mailhaven.routing.route import Route
from mailhaven.scheduler.dead import DeadDestinations
from mailhaven.scheduler.plan import Suspension

DOWN = Reply(421, "no", "4.4.1")
MX = Route("relay", "mx.example")
OTHER = Route("relay", "other.example")


def test_a_suspension_lasts_its_time_on_the_clock(clock: FakeClock) -> None:
    dead = DeadDestinations(clock)
    dead.suspend(MX, DOWN, 300.0)
    assert dead.current() == {MX: Suspension(1300.0, DOWN)}
    clock.now = 1299.9
    assert MX in dead.current()
    clock.now = 1300.0  # the time is up: tried again
    assert dead.current() == {}


def test_routes_are_separate_and_a_new_failure_extends(clock: FakeClock) -> None:
    dead = DeadDestinations(clock)
    dead.suspend(MX, DOWN, 300.0)
    clock.now += 100
    dead.suspend(OTHER, DOWN, 300.0)
    dead.suspend(MX, Reply(451, "again", "4.4.2"), 300.0)
    assert dead.current() == {
        MX: Suspension(1400.0, Reply(451, "again", "4.4.2")),
        OTHER: Suspension(1400.0, DOWN),
    }
    assert len(dead.current()) == 2  # one entry per route, however often it fails


def test_forget_is_a_flush(clock: FakeClock) -> None:
    dead = DeadDestinations(clock)
    dead.suspend(MX, DOWN, 300.0)
    dead.forget()
    assert dead.current() == {}
