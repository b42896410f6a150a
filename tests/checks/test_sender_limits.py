"""Per-user sender limits: sliding windows, one alert per window, bounded memory, reloads."""

from __future__ import annotations

from mailhaven.checks.sender_limits import SenderLimiter


def test_messages_over_the_limit_are_refused_and_alerted_once() -> None:
    limiter = SenderLimiter(messages=3, recipients=100, window=60)
    assert all(limiter.message("bob", 0.0 + i).allowed for i in range(3))
    first = limiter.message("bob", 4.0)
    assert not first.allowed and first.alert and first.what == "messages" and first.limit == 3
    second = limiter.message("bob", 5.0)
    assert not second.allowed and not second.alert
    assert limiter.message("alice", 5.0).allowed  # others are not affected
    assert limiter.message("BOB", 61.0).allowed  # the first one has left the window


def test_alert_again_in_a_later_window() -> None:
    limiter = SenderLimiter(messages=1, recipients=100, window=10)
    assert limiter.message("bob", 0).allowed
    assert limiter.message("bob", 1).alert
    assert limiter.message("bob", 10.5).allowed
    assert limiter.message("bob", 11.5).alert


def test_recipients_count_separately() -> None:
    limiter = SenderLimiter(messages=100, recipients=2, window=60)
    assert limiter.recipient("bob", 0).allowed and limiter.recipient("bob", 0).allowed
    verdict = limiter.recipient("bob", 1)
    assert not verdict.allowed and verdict.what == "recipients"
    assert limiter.message("bob", 1).allowed


def test_zero_is_off() -> None:
    limiter = SenderLimiter(messages=0, recipients=0)
    assert all(limiter.message("bob", 0).allowed for _ in range(1000))


def test_reload_lowers_the_limit_and_keeps_counts() -> None:
    limiter = SenderLimiter(messages=10, recipients=10, window=60)
    for i in range(5):
        limiter.message("bob", i)
    limiter.messages = 3
    assert not limiter.message("bob", 6).allowed


def test_memory_is_bounded() -> None:
    limiter = SenderLimiter(messages=5, recipients=5, max_users=10)
    for n in range(100):
        limiter.message(f"user{n}", 0)
    assert len(limiter._users) == 10
