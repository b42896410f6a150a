"""Queue ids: short, unique, alphanumeric, sorting roughly by arrival (like Postfix long ids).

An id is 15 characters of Crockford base-32 (digits and upper-case letters without I, L, O, U,
so ids are safe in file names, logs and SMTP replies): 11 characters of wall-clock microseconds
since the epoch (good until the year 3100) followed by 4 characters of a per-process counter that
starts at a random value.

Invariants: within one process the ids are strictly increasing, even if the clock stands still
or steps backwards (the previous value is carried forward and the counter bumped). Across
processes the random counter start makes a collision at the same microsecond unlikely, and the
spool's primary key turns the remaining chance into a failed commit, never a silent overwrite.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
TIME_DIGITS = 11
COUNTER_DIGITS = 4
QUEUE_ID_LENGTH = TIME_DIGITS + COUNTER_DIGITS
_COUNTER_SPAN = len(ALPHABET) ** COUNTER_DIGITS


#: every two-digit string, by value (0..1023): two digits per lookup, 5 bits each
_PAIRS = [a + b for a in ALPHABET for b in ALPHABET]


def encode(value: int, width: int) -> str:
    """Fixed-width base-32 rendering, most significant digit first (so text order = order)."""
    shift = 5 * width
    if value < 0 or value >> shift:
        raise ValueError("value does not fit in width")
    digits = []
    if width % 2:
        shift -= 5
        digits.append(ALPHABET[(value >> shift) & 31])
    while shift:
        shift -= 10
        digits.append(_PAIRS[(value >> shift) & 1023])
    return "".join(digits)


def is_queue_id(text: str) -> bool:
    """True when `text` has the shape of an id we made (guards paths built from ids)."""
    return len(text) == QUEUE_ID_LENGTH and all(c in ALPHABET for c in text)


class QueueIdFactory:
    """Makes ids; thread-safe because the receiver and bounce paths may call it concurrently."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._last_us = 0
        self._counter = secrets.randbelow(_COUNTER_SPAN)

    def __call__(self) -> str:
        with self._lock:
            now_us = int(self._clock() * 1_000_000)
            self._counter = (self._counter + 1) % _COUNTER_SPAN
            if now_us <= self._last_us:
                now_us = self._last_us
                if self._counter == 0:  # wrapped inside one microsecond: borrow the next one
                    now_us += 1
            self._last_us = now_us
            return encode(now_us, TIME_DIGITS) + encode(self._counter, COUNTER_DIGITS)
