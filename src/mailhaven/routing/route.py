"""`Route`: where one final recipient goes, the record routing hands the scheduler.

The scheduler groups a message's recipients by route and gives each group to the delivery agent
registered for `route.transport`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: local: a mailbox here; relay: another host (MX lookup or a configured next hop);
#: hold: queued for a part-time host until ETRN or a schedule releases it; lmtp: final
#: delivery to a mail store over LMTP (RFC 2033, e.g. Dovecot's lmtp).
Transport = Literal["local", "relay", "hold", "lmtp"]
#: A transport-map entry that starts with this goes to the lmtp transport (Postfix's form).
LMTP_PREFIX = "lmtp:"


@dataclass(frozen=True, slots=True)
class Route:
    """Where one recipient goes.

    `nexthop` is, for local: the mailbox (user) name; for relay: the destination domain, or an
    explicit `[host]:port` / `host:port` smarthost; for hold: the held domain; for lmtp:
    `unix:/path` or `[host]:port` / `host:port` of the LMTP server.
    """

    transport: Transport
    nexthop: str


def transport_route(entry: str) -> Route:
    """A transport-map entry as a route: `lmtp:unix:/run/dovecot/lmtp` or `lmtp:[::1]:24` is
    the lmtp transport; anything else (`[host]:port`, `domain`) a relay next hop."""
    if entry.lower().startswith(LMTP_PREFIX):
        return Route("lmtp", entry[len(LMTP_PREFIX):])
    return Route("relay", entry)
