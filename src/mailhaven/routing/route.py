"""`Route`: where one final recipient goes, the record routing hands the scheduler.

The scheduler groups a message's recipients by route and gives each group to the delivery agent
registered for `route.transport`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: local: a mailbox here; relay: another host (MX lookup or a configured next hop);
#: hold: queued for a part-time host until ETRN or a schedule releases it.
Transport = Literal["local", "relay", "hold"]


@dataclass(frozen=True, slots=True)
class Route:
    """Where one recipient goes.

    `nexthop` is, for local: the mailbox (user) name; for relay: the destination domain, or an
    explicit `[host]:port` / `host:port` smarthost; for hold: the held domain.
    """

    transport: Transport
    nexthop: str
