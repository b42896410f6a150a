"""The envelope sender of forwarded mail: relayed copies leave with the SRS address.

In: delivery requests for the relay agent. Out: the same requests, with the sender intake chose
for forwarded copies (`routing.srs.SRS_SENDER` in the envelope's `extra`) when there is one;
the agent's result unchanged. Local copies never pass here, so they keep the original sender.
Trust: the value was put there by our own intake (it is not in the message), so it is used as
it is.
"""

from __future__ import annotations

from dataclasses import replace

from mailhaven.delivery.base import DeliveryAgent, DeliveryRequest, DeliveryResult
from mailhaven.routing.srs import SRS_SENDER


class RewrittenSender:
    """Wraps the relay agent: a message intake gave an SRS sender (`SRS_SENDER`) leaves with
    it; everything else is passed through unchanged."""

    def __init__(self, agent: DeliveryAgent) -> None:
        self.agent = agent

    async def deliver(self, request: DeliveryRequest) -> DeliveryResult:
        rewritten = request.envelope.extra.get(SRS_SENDER)
        if rewritten:
            request = replace(request, envelope=replace(request.envelope, sender=rewritten))
        return await self.agent.deliver(request)
