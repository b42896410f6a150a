"""Idle milter connections kept for the next SMTP session (`milter_reuse`), per address.

In: a connection whose SMTP session ended in step (`give`, after SMFIC_QUIT_NC). Out: such a
connection for a new session (`take`), or None (the caller connects afresh).

Why: the milter protocol (version 6) lets one milter connection serve SMTP session after SMTP
session (SMFIC_QUIT_NC), skipping the TCP connect, the option negotiation and the milter's own
per-connection setup each time. rspamd implements it; libmilter-based milters vary, so it is
opt-in per milter address.

Invariants: at most `MAX_IDLE` connections per address; one idle longer than `MAX_IDLE_TIME`,
closed by the milter, or out of step is closed instead of reused. A connection the milter
closes just after `take` fails like any milter failure (the default action for that message).
"""

from __future__ import annotations

import time
from collections import deque

from mailhaven.checks.milter.client import MilterClient

#: idle connections kept per milter address
MAX_IDLE = 64
#: seconds a connection may sit idle before it is closed (milters time idle clients out)
MAX_IDLE_TIME = 30.0

_idle: dict[str, deque[tuple[float, MilterClient]]] = {}


def take(spec: str) -> MilterClient | None:
    queue = _idle.get(spec)
    now = time.monotonic()
    while queue:
        since, client = queue.pop()  # the most recently used: warmest, least likely closed
        if now - since <= MAX_IDLE_TIME and client.reusable:
            return client
        client.close()
    return None


def give(client: MilterClient) -> None:
    queue = _idle.setdefault(client.endpoint.spec, deque())
    if len(queue) >= MAX_IDLE or not client.reusable:
        client.quit()
        return
    # SMFIC_QUIT_NC is queued, not written: it goes out with the next session's first write
    # (one write per reused session less); a connection closed idle never needed it
    client.conn.quit_new_connection()
    queue.append((time.monotonic(), client))


def clear() -> None:
    """Close every idle connection (tests, shutdown)."""
    for queue in _idle.values():
        while queue:
            queue.pop()[1].close()
    _idle.clear()
