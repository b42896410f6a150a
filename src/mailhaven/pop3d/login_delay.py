"""LOGIN-DELAY (RFC 2449 §6.5): when each user last got into a maildrop.

In: a canonical user name, the configured delay and a monotonic time (the event loop's clock).
Out: whether a new login of that user comes too soon after the last one that got in.

One `LoginTimes` is shared by every POP3 listener of the daemon (pop3 and pop3s, any number of
addresses): the delay is per user, not per port, so a client cannot skip it by switching from
110 to 995. POP3 runs in the daemon process only (worker processes serve SMTP), so an in-memory
table is the whole truth; a restart forgets it, which errs towards letting a user in.

Invariants: only a login that got the maildrop lock is recorded (`record`), so a login refused
with [IN-USE] or [SYS/TEMP] does not start a delay. Only users who gave their password get an
entry, so the table is bounded by the users file; past `MAX_USERS` entries, those older than
the delay are swept at each record.
"""

from __future__ import annotations

#: Users remembered before the entries older than the delay are swept.
MAX_USERS = 10_000


class LoginTimes:
    """user -> time of the last login that got in."""

    def __init__(self, max_users: int = MAX_USERS) -> None:
        self._last: dict[str, float] = {}
        self.max_users = max_users

    def too_soon(self, name: str, delay: int, now: float) -> bool:
        """A login of `name` at `now` comes within `delay` seconds of the last one that got in."""
        previous = self._last.get(name)
        return bool(delay) and previous is not None and now - previous < delay

    def record(self, name: str, delay: int, now: float) -> None:
        """`name` got in at `now` (nothing is kept when no delay is configured)."""
        if not delay:
            return
        if len(self._last) >= self.max_users:
            for user, when in list(self._last.items()):
                if now - when >= delay:
                    del self._last[user]
        self._last[name] = now
