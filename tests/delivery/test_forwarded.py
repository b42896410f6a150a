"""Relayed copies of forwarded mail leave with the SRS sender intake chose; others unchanged."""

from __future__ import annotations

from mailhaven.delivery.base import DeliveryRequest, DeliveryResult
from mailhaven.delivery.forwarded import RewrittenSender
from mailhaven.proto.envelope import Envelope, RecipientSpec
from mailhaven.routing.route import Route
from mailhaven.routing.srs import SRS_SENDER


class Agent:
    def __init__(self) -> None:
        self.senders: list[str] = []

    async def deliver(self, request: DeliveryRequest) -> DeliveryResult:
        self.senders.append(request.envelope.sender)
        return DeliveryResult({}, "none")


async def test_relayed_copies_use_the_srs_sender() -> None:
    agent = Agent()
    wrapper = RewrittenSender(agent)
    for extra in ({SRS_SENDER: "SRS0=x=y=b.example=a@example.org"}, {}):
        envelope = Envelope("a@b.example", (RecipientSpec("c@d.example"),), extra=extra)
        await wrapper.deliver(DeliveryRequest("Q1", envelope, ("c@d.example",),
                                              Route("relay", "d.example"), lambda: None, 1))  # type: ignore[arg-type,return-value]
    assert agent.senders == ["SRS0=x=y=b.example=a@example.org", "a@b.example"]
