"""The bounce role: delivery status notifications (RFC 3464) for mail that failed or was delayed.

`dsn` builds the report (pure); `notifier` decides who gets one and queues it through intake
with the null sender, so a report can never cause another. In: the scheduler's per-recipient
verdicts. Out: new messages through `intake`. May import intake, spool records and proto.
"""
