"""What the four sans-I/O protocol cores share: the `Wait` sentinels and the usage error.

Each core (`smtp_server`, `smtp_client`, `pop3`, `milter`) has the same shape: bytes in
(`receive_data`), events out (`next_event`), answers in, bytes out (`data_to_send`). When
`next_event` has no event to hand out it returns a member of `Wait` saying whose turn it is; the
events themselves are frozen dataclasses in the core's own `<core>_events` module.

Invariant: a core raises `UsageError` only for a caller's bug (answering twice, answering out of
turn); bad input from the peer is always answered on the wire, never raised.
"""

from __future__ import annotations

import enum
from typing import Final


class Wait(enum.Enum):
    """No event now: NEED_DATA (feed more bytes) or PAUSED (the application's turn)."""

    NEED_DATA = "NEED_DATA"
    PAUSED = "PAUSED"


NEED_DATA: Final = Wait.NEED_DATA
#: A decision is outstanding (server cores) or the caller must act (client cores: SMTP, milter).
PAUSED: Final = Wait.PAUSED


class UsageError(RuntimeError):
    """The application called a core out of turn (a bug in the caller, not the peer)."""
