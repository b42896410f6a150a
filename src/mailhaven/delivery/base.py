"""The narrow interface between the scheduler and the delivery agents.

The scheduler groups a message's pending recipients by `Route` and hands one `DeliveryRequest`
per group to the agent registered for `route.transport`. The agent answers with a
`DeliveryResult`: one `Reply` per recipient (foxcpp/maddy's model: 2xx delivered, 4xx try again
later, 5xx give up and bounce) and the host that gave them. An agent never raises for an
expected failure; the scheduler treats any exception as a 4xx.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from mailhaven.proto.envelope import Envelope
from mailhaven.proto.replies import Reply
from mailhaven.routing.route import Route


@dataclass(frozen=True, slots=True)
class DeliveryRequest:
    """One attempt at delivering one message to a group of recipients sharing a route."""

    queue_id: str
    envelope: Envelope
    #: The recipients of this attempt (final addresses, after alias expansion).
    recipients: tuple[str, ...]
    route: Route
    #: Returns a fresh readable binary stream over the stored message (trace headers included).
    open_message: Callable[[], BinaryIO]
    size: int
    #: The stored message is known to hold no bare CR (it came through SMTP's framing, which
    #: refuses them), so a Maildir copy may drop every CR without looking for one first.
    no_bare_cr: bool = False


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """An agent's answer to one `DeliveryRequest`.

    `replies`: one `Reply` per recipient of the request (a missing one counts as a 4xx).
    `relay_host`: who gave them, as Postfix logs `relay=`: `host[ip]:port` for a remote
    host, "local" for the local transport, "none" when no host was reached; the scheduler
    logs it and stores it for the DSN's Remote-MTA.
    `notify_passed`: recipients accepted by a next hop that advertised DSN, with their
    NOTIFY=SUCCESS passed on: that hop now reports their delivery, so we must not also send
    our "relayed" notice (RFC 3461 §4.1; Postfix does the same).
    """

    replies: Mapping[str, Reply]
    relay_host: str
    notify_passed: frozenset[str] = frozenset()


class DeliveryAgent(Protocol):
    """A transport: takes a request, returns a Reply for each of its recipients."""

    async def deliver(self, request: DeliveryRequest) -> DeliveryResult: ...
