"""Delivery agents, one per transport: local Maildir and SMTP relay.

Each agent takes a `base.DeliveryRequest` (one message, the recipients sharing a route) and
answers one `Reply` per recipient; it never raises for an expected failure. In: requests from
the scheduler. Out: per-recipient results. May import mailbox, net, routing and proto.
"""
