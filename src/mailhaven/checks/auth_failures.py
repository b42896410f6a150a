"""Failed-login limiter per (client address, user) and per client address, shared by POP3 and
SMTP AUTH.

Pure policy: no clock, no I/O. Callers pass `now` (a monotonic time, e.g. `loop.time()`), so
tests never sleep. Like Dovecot's auth penalty, the brake falls on the address that guesses,
so an attacker elsewhere can never lock a user out of their own logins:
- a pair (address, user) is blocked after `max_failures` failures inside the sliding `window`:
  guessing one user's password from one address stops there;
- an address is blocked after `max_address_failures` failures (any users) inside `window`,
  which stops password spraying; it is higher than the pair's, so a user who mistypes on a
  shared (NAT) address does not block the others behind it;
- before that, an address with recent failures backs off: each attempt from it first waits
  `penalty()`, `failure_delay` doubled per failure up to PENALTY_MAX_FACTOR times (Dovecot:
  2, 4, 8, 15 s), which lapses once the address has not failed for PENALTY_TIMEOUT_FACTOR
  times `failure_delay` (Dovecot's AUTH_PENALTY_TIMEOUT, 29 s).
An address is counted whole (IPv6 per /64). A block lifts when its oldest failure ages out. A
successful login clears its pair's count, not the address's (one right password must not
launder a password-spraying address).

How the application uses it: normalise the login name once (`mailbox.users.normalize_name`) and
pass the same name here and to the lookup, so `" alice"` and `"ALICE"` share alice's count;
sleep `penalty` (in that session's task: other sessions go on), then `check` before verifying,
and when blocked answer with a delayed failure without spending CPU on the hash; `failed` after
a wrong password; `succeeded` after a right one. `failure_delay` is how long to wait before
answering any failure (Dovecot's `auth_failure_delay`, 2 s by default), which slows guessing.
The limits are attributes: a configuration reload changes them and keeps the counts.

Memory is bounded: at most `max_keys` keys are tracked; the stalest are forgotten first.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass

#: Failures of one (address, user) pair in WINDOW that block the pair (fail2ban's spirit).
MAX_FAILURES = 10
#: Failures of one address, any users, in WINDOW that block the address.
MAX_ADDRESS_FAILURES = 30
WINDOW = 600.0
#: Dovecot auth_failure_delay = 2 secs.
FAILURE_DELAY = 2.0
#: Dovecot AUTH_PENALTY_MAX_SECS / AUTH_PENALTY_INIT_SECS = 15 / 2: the back-off's ceiling.
PENALTY_MAX_FACTOR = 7.5
#: Dovecot AUTH_PENALTY_TIMEOUT = 2 + 4 + 8 + 15 s: a back-off this old no longer applies.
PENALTY_TIMEOUT_FACTOR = 1 + 2 + 4 + PENALTY_MAX_FACTOR
#: Failures that reach the ceiling (2, 4, 8, 15): the most the back-off looks back at.
PENALTY_STEPS = 4
MAX_KEYS = 100_000


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    retry_after: float = 0.0  # seconds until the block lifts, when not allowed


class AuthLimiter:
    """Sliding-window failure counts for (address, user) pairs and for addresses."""

    def __init__(
        self,
        *,
        max_failures: int = MAX_FAILURES,
        max_address_failures: int = MAX_ADDRESS_FAILURES,
        window: float = WINDOW,
        failure_delay: float = FAILURE_DELAY,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self.max_failures = max_failures
        self.max_address_failures = max_address_failures
        self.window = window
        self.failure_delay = failure_delay
        self._max_keys = max_keys
        self._failures: dict[str, deque[float]] = {}

    def check(self, ip: str, user: str | None, now: float) -> Verdict:
        """May `user` (normalised; None when it is no valid name) try a password from `ip`?"""
        address = _ip_key(ip)
        wait = self._blocked_for(address, self.max_address_failures, now)
        if user:
            wait = max(wait, self._blocked_for(_user_key(address, user), self.max_failures, now))
        return Verdict(wait <= 0.0, wait)

    def penalty(self, ip: str, now: float) -> float:
        """Seconds an attempt from `ip` waits before it is looked at (Dovecot's auth penalty):
        one `failure_delay` per recent failure in a row, doubled each time, up to the ceiling."""
        times = self._failures.get(_ip_key(ip))
        timeout = self.failure_delay * PENALTY_TIMEOUT_FACTOR
        if not times or times[-1] <= now - timeout:
            return 0.0
        steps, later = 0, now
        for at in reversed(times):  # the failures in a row, none a timeout after the one before
            if at <= later - timeout or steps == PENALTY_STEPS:
                break
            steps, later = steps + 1, at
        return self.failure_delay * min(2.0 ** (steps - 1), PENALTY_MAX_FACTOR)

    def failed(self, ip: str, user: str | None, now: float) -> None:
        address = _ip_key(ip)
        self._record(address, max(self.max_address_failures, PENALTY_STEPS), now)
        if user:
            self._record(_user_key(address, user), self.max_failures, now)

    def succeeded(self, ip: str, user: str, now: float) -> None:
        self._failures.pop(_user_key(_ip_key(ip), user), None)

    def _blocked_for(self, key: str, limit: int, now: float) -> float:
        times = self._failures.get(key)
        if not times:
            return 0.0
        self._expire(times, now)
        if len(times) < limit:
            return 0.0
        return times[-limit] + self.window - now  # until one too few are left in the window

    def _record(self, key: str, keep: int, now: float) -> None:
        times = self._failures.pop(key, None)  # re-insert: dict order is staleness order
        if times is None:
            times = deque()
            while len(self._failures) >= self._max_keys:
                del self._failures[next(iter(self._failures))]
        self._expire(times, now)
        times.append(now)
        while len(times) > keep:  # trimmed here, not by maxlen: a reload may change `keep`
            times.popleft()
        self._failures[key] = times

    def _expire(self, times: deque[float], now: float) -> None:
        while times and times[0] <= now - self.window:
            times.popleft()


def _ip_key(ip: str) -> str:
    """IPv6 clients usually own a whole /64, so they are counted per /64."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return f"ip:{ip}"
    if address.version == 6:
        return f"ip:{ipaddress.ip_network(f'{ip}/64', strict=False)}"
    return f"ip:{address}"


def _user_key(address: str, user: str) -> str:
    return f"{address} user:{user.lower()}"
