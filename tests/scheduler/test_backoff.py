"""Backoff: retry delays from the time in queue, expiry, the delay warning."""

from __future__ import annotations

import pytest

from mailhaven.scheduler.backoff import (
    DAY,
    BackoffPolicy,
    delay_warning_due,
    expired,
    next_attempt,
    retry_delay,
)

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
