"""Retry timing: when to try a deferred recipient again, and when to give up (pure).

Postfix semantics (qmgr): after a temporary failure the next attempt waits as long as the message
has already been queued, clamped to [`minimal`, `maximal`] (minimal_backoff_time = 300 s,
maximal_backoff_time = 4000 s), so a young message is retried soon and an old one about hourly.
A message older than `lifetime` (maximal_queue_lifetime = 5 days; `bounce_lifetime` for
null-sender mail, bounce_queue_lifetime) is not deferred again: the failure becomes final.

Optional delay warning (delay_warning_time, off when None): tell the sender once that the message
is still queued after that long.
"""

from __future__ import annotations

from dataclasses import dataclass

DAY = 86_400.0


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    minimal: float = 300.0
    maximal: float = 4000.0
    lifetime: float = 5 * DAY
    bounce_lifetime: float = 5 * DAY
    delay_warning: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.minimal <= self.maximal:
            raise ValueError("need 0 < minimal <= maximal backoff")
        if self.lifetime < 0 or self.bounce_lifetime < 0:
            raise ValueError("queue lifetimes must not be negative")


def retry_delay(policy: BackoffPolicy, arrival: float, now: float) -> float:
    """Seconds to wait before the next attempt: time in queue, clamped."""
    return min(max(now - arrival, policy.minimal), policy.maximal)


def next_attempt(policy: BackoffPolicy, arrival: float, now: float) -> float:
    return now + retry_delay(policy, arrival, now)


def expired(policy: BackoffPolicy, arrival: float, now: float, *, null_sender: bool) -> bool:
    """True when a temporary failure at `now` must be treated as final."""
    limit = policy.bounce_lifetime if null_sender else policy.lifetime
    return now - arrival >= limit


def delay_warning_due(
    policy: BackoffPolicy, arrival: float, now: float, *, already_warned: bool
) -> bool:
    return (
        policy.delay_warning is not None
        and not already_warned
        and now - arrival >= policy.delay_warning
    )
