"""The narrow interface between the scheduler and the delivery agents.

The scheduler groups a message's pending recipients by `Route` and hands one `DeliveryRequest`
per group to the agent registered for `route.transport`. The agent answers with one `Reply` per
recipient (foxcpp/maddy's model): 2xx delivered, 4xx try again later, 5xx give up and bounce.
An agent never raises for an expected failure; the scheduler treats any exception as a 4xx.
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


class DeliveryAgent(Protocol):
    """A transport: takes a request, returns a Reply for each of its recipients."""

    async def deliver(self, request: DeliveryRequest) -> Mapping[str, Reply]: ...
