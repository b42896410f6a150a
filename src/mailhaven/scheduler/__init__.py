"""The schedule role (Postfix's qmgr): which queued recipient is tried when, and by whom.

Pure policy, clock injected: `backoff` (when to try again), `plan` (which recipients go out
together, within the concurrency limits), `outcome` (what a delivery's replies mean for each
recipient: done, retry, bounce), `dead` (destinations that failed as a whole, left alone for a
while). Around it: `active` is the bounded in-memory queue of new mail
and the backlog, the one seam intake commits through; `direct` delivers a local-only message
before its 250 and queues only what failed; `runner` is the loop that takes due recipients,
routes them and hands them to a delivery agent; `ports` are the protocols it needs from the
spool and the delivery agents.

In: committed messages (from intake) and due recipients (from the spool). Out: delivery
attempts, per-recipient results recorded in the spool, failures handed to bounce. May import
delivery, routing, spool, runtime and proto (the layers in pyproject.toml); never intake or
smtpd, which call it through `active`.
"""

from mailhaven.scheduler.backoff import BackoffPolicy
from mailhaven.scheduler.plan import Limits
from mailhaven.scheduler.ports import OnFailures, SchedulerSpool
from mailhaven.scheduler.runner import Runner

__all__ = ["BackoffPolicy", "Limits", "OnFailures", "Runner", "SchedulerSpool"]
