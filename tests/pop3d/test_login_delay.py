"""LOGIN-DELAY's table: per user, only logins that got in, bounded."""

from __future__ import annotations

from mailhaven.pop3d.login_delay import LoginTimes


def test_too_soon_only_within_the_delay_of_a_recorded_login() -> None:
    times = LoginTimes()
    assert not times.too_soon("alice@a.example", 900, 0.0)  # checking records nothing
    assert not times.too_soon("alice@a.example", 900, 1.0)
    times.record("alice@a.example", 900, 1.0)
    assert times.too_soon("alice@a.example", 900, 900.9)
    assert not times.too_soon("alice@a.example", 900, 901.0)
    assert not times.too_soon("bob@a.example", 900, 2.0)
    assert not times.too_soon("alice@a.example", 0, 2.0)  # no delay configured


def test_no_delay_keeps_nothing_and_the_table_is_swept() -> None:
    times = LoginTimes(max_users=3)
    times.record("x@a.example", 0, 0.0)
    assert not times.too_soon("x@a.example", 10, 1.0)
    for n in range(3):
        times.record(f"u{n}@a.example", 10, float(n))
    times.record("late@a.example", 10, 11.5)  # u0, u1 are older than the delay: swept
    assert sorted(times._last) == ["late@a.example", "u2@a.example"]
