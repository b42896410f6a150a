"""Failed-login limiter per client address and per (address, user), shared by POP3 and SMTP AUTH.

Pure policy: no clock, no I/O. Callers pass `now` (a monotonic time, e.g. `loop.time()`), so
tests never sleep. A key is blocked once it has `max_failures` failures inside the sliding
`window`; it is free again when the oldest of them ages out. The keys are the client's address
(an IPv6 client by its /64) and the pair (address, user): like Dovecot's auth penalty, the
brake falls on the address that guesses, so an attacker elsewhere can never lock a user out of
their own logins. A successful login clears its pair's count, not the address's (one right
password must not launder a password-spraying address).

How the application uses it: normalise the login name once (`mailbox.users.normalize_name`) and
pass the same name here and to the lookup, so `" alice"` and `"ALICE"` share alice's count;
`check` before verifying, and when blocked answer with the same delayed failure as a wrong
password, without spending CPU on the hash; `failed` after a wrong password; `succeeded` after a
right one. `failure_delay` is how long to wait before answering any failure (Dovecot's
`auth_failure_delay`, 2 s by default), which slows guessing.

Memory is bounded: at most `max_keys` keys are tracked; the stalest are forgotten first.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass

#: Defaults in Dovecot's and fail2ban's spirit: 10 failures in 10 minutes block a key.
MAX_FAILURES = 10
WINDOW = 600.0
FAILURE_DELAY = 2.0
MAX_KEYS = 100_000


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    retry_after: float = 0.0  # seconds until the block lifts, when not allowed


class AuthLimiter:
    """Sliding-window failure counts for addresses and (address, user) pairs."""

    def __init__(
        self,
        *,
        max_failures: int = MAX_FAILURES,
        window: float = WINDOW,
        failure_delay: float = FAILURE_DELAY,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.failure_delay = failure_delay
        self._max_keys = max_keys
        self._failures: dict[str, deque[float]] = {}

    def check(self, ip: str, user: str | None, now: float) -> Verdict:
        address = _ip_key(ip)
        wait = max(self._blocked_for(address, now),
                   self._blocked_for(_user_key(address, user), now) if user else 0.0)
        return Verdict(wait <= 0.0, wait)

    def failed(self, ip: str, user: str | None, now: float) -> None:
        address = _ip_key(ip)
        self._record(address, now)
        if user:
            self._record(_user_key(address, user), now)

    def succeeded(self, ip: str, user: str, now: float) -> None:
        self._failures.pop(_user_key(_ip_key(ip), user), None)

    def _blocked_for(self, key: str, now: float) -> float:
        times = self._failures.get(key)
        if not times:
            return 0.0
        self._expire(times, now)
        if len(times) < self.max_failures:
            return 0.0
        return times[0] + self.window - now

    def _record(self, key: str, now: float) -> None:
        times = self._failures.pop(key, None)  # re-insert: dict order is staleness order
        if times is None:
            times = deque(maxlen=self.max_failures)
            while len(self._failures) >= self._max_keys:
                del self._failures[next(iter(self._failures))]
        self._expire(times, now)
        times.append(now)
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
