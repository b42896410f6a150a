"""Outbound abuse limits: message and recipient rates per authenticated user (submission).

A stolen password turns a submission account into a spam cannon within minutes; a rate that no
person reaches stops it at a few hundred messages instead of a few hundred thousand, and tells
the postmaster. In: the user (`sasl_username`), `now` (monotonic seconds), and per recipient
one count. Out: a `Verdict`: allowed or not, and `alert` the first time a user is stopped in a
window (the session logs a warning and the postmaster gets a notice, once, not per refusal).

Sliding windows, like `smtpd.rates`: a user's timestamps are kept while inside `window`, at most
`limit` of them (so memory per user is bounded by the limit), for at most MAX_USERS users (the
stalest forgotten first). A limit of 0 is off. The limits are attributes: a reload changes them
and keeps the counts. Counted per process (submission runs in the daemon only).

Pure: no clock, no I/O.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

#: Generous defaults, far above a person and far below a spam run (Gmail allows a personal
#: account about 500 recipients a day; a shared role account may send more).
DEFAULT_MESSAGES = 200
DEFAULT_RECIPIENTS = 1000
DEFAULT_WINDOW = 3600.0
MAX_USERS = 100_000


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    #: first refusal of this user in this window: log a warning and notify the postmaster
    alert: bool = False
    #: the limit that was hit ("messages" or "recipients") and its figures, for the texts
    what: str = ""
    limit: int = 0


class _Window:
    __slots__ = ("alerted_until", "messages", "recipients")

    def __init__(self) -> None:
        self.messages: deque[float] = deque()
        self.recipients: deque[float] = deque()
        self.alerted_until = 0.0


class SenderLimiter:
    def __init__(
        self,
        *,
        messages: int = DEFAULT_MESSAGES,
        recipients: int = DEFAULT_RECIPIENTS,
        window: float = DEFAULT_WINDOW,
        max_users: int = MAX_USERS,
    ) -> None:
        self.messages = messages
        self.recipients = recipients
        self.window = window
        self._max_users = max_users
        self._users: OrderedDict[str, _Window] = OrderedDict()

    def message(self, user: str, now: float) -> Verdict:
        """Count one message (MAIL FROM) of `user`, or refuse it."""
        return self._count(user, now, "messages", self.messages)

    def recipient(self, user: str, now: float) -> Verdict:
        """Count one recipient (RCPT TO) of `user`, or refuse it."""
        return self._count(user, now, "recipients", self.recipients)

    def _count(self, user: str, now: float, what: str, limit: int) -> Verdict:
        if limit <= 0:
            return Verdict(True)
        key = user.lower()
        state = self._users.pop(key, None) or _Window()
        self._users[key] = state  # most recently used last
        while len(self._users) > self._max_users:
            self._users.popitem(last=False)
        times = state.messages if what == "messages" else state.recipients
        while times and times[0] <= now - self.window:
            times.popleft()
        while len(times) > limit:  # a reload lowered the limit
            times.popleft()
        if len(times) < limit:
            times.append(now)
            return Verdict(True)
        alert = now >= state.alerted_until
        if alert:
            state.alerted_until = now + self.window
        return Verdict(False, alert, what, limit)
