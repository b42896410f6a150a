"""The bounce role: turns the scheduler's verdicts into delivery status notifications.

In: a finished message and its recipients that failed for good (the scheduler's `on_failures`
hook), or recipients delivered with NOTIFY=SUCCESS. Out: an RFC 3464 report built by
`bounce.build_dsn`, queued through intake like any other message.

Loop safety (RFC 5321 §4.5.5, §6.1): reports go out with the null sender, so a failing report
is never bounced back to anybody; if a null-sender message fails, one copy goes to the
postmaster from `double-bounce@<hostname>` (Postfix's double bounce), and if *that* fails it is
only logged. NOTIFY=NEVER and the NOTIFY list are respected per recipient.

Backscatter: a forged sender address would receive our notices about mail it never sent. Mail
that fails the sender checks (`smtpd.policy`: AUTH required, sender/login mismatch) is refused
at MAIL FROM, so it is never queued and never notified about; for the rest, `NoticeLimiter`
caps the notices one address receives (`queue.notice_rate_limit` per `notice_rate_window`);
the surplus is logged and dropped, not queued.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from mailhaven.bounce.dsn import (
    Action,
    DsnKind,
    RecipientResult,
    bounce_target,
    build_dsn,
    return_content_for,
    should_notify,
)
from mailhaven.faults import crash_point
from mailhaven.intake.cleanup import Intake, Refused
from mailhaven.proto.envelope import Envelope, RecipientSpec
from mailhaven.spool.records import RecipientState, Status, StoredMessage
from mailhaven.spool.store import Spool

log = logging.getLogger("mailhaven.bounce")

#: Addresses the limiter remembers at most (memory bound under a flood of forged senders);
#: past it, the least recently charged are forgotten.
MAX_TRACKED_ADDRESSES = 100_000


class NoticeLimiter:
    """At most `limit` notices per `window` seconds to one address (a token bucket per
    lower-cased address, refilled continuously). `limit` 0: no limit."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, when)

    def allow(self, address: str, now: float) -> bool:
        """Charge one notice to `address`; False when its allowance is used up."""
        if self.limit <= 0:
            return True
        key = address.lower()
        tokens, then = self._buckets.pop(key, (float(self.limit), now))
        tokens = min(float(self.limit), tokens + (now - then) * self.limit / self.window)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)  # now the newest
        while len(self._buckets) > MAX_TRACKED_ADDRESSES:
            del self._buckets[next(iter(self._buckets))]
        return allowed


class Notifier:
    """Builds and queues DSNs; one per finished message and kind."""

    def __init__(
        self,
        spool: Spool,
        intake: Callable[[], Intake],
        *,
        hostname: str,
        postmaster: str,
        clock: Callable[[], float] = time.time,
        limiter: NoticeLimiter | None = None,
    ) -> None:
        self._spool = spool
        self._intake = intake
        self.hostname = hostname
        self.postmaster = postmaster
        self.double_bounce_sender = f"double-bounce@{hostname}"
        self._clock = clock
        self._limiter = limiter or NoticeLimiter(0, 1.0)

    async def on_failures(self, message: StoredMessage, states: Sequence[RecipientState]) -> None:
        """The scheduler's finish hook: report failures (and successes asked for by NOTIFY)."""
        failures = [
            s for s in states if s.status is Status.BOUNCED and should_notify(s.notify, _kind(s))
        ]
        if failures:
            kind: DsnKind = "expired" if all(_kind(s) == "expired" for s in failures) else "failure"
            await self.notify(message, failures, kind)
        successes = [
            s for s in states if s.status is Status.SENT and should_notify(s.notify, "success")
        ]
        if successes:
            await self.notify(message, successes, "success")

    async def on_delay(self, message: StoredMessage, states: Sequence[RecipientState]) -> None:
        """The scheduler's delay-warning hook (only when `queue.delay_warning` is set)."""
        delayed = [s for s in states if should_notify(s.notify, "delay")]
        if delayed:
            await self.notify(message, delayed, "delay")

    async def notify(
        self, message: StoredMessage, states: Sequence[RecipientState], kind: DsnKind
    ) -> str | None:
        """Queue one report about `states`; returns its queue id (None: dropped)."""
        env = message.envelope
        target = bounce_target(env, kind, double_bounce_sender=self.double_bounce_sender)
        if target == "drop":
            log.info("%s: dropping %s notice about a notice (no loop)", message.queue_id, kind)
            return None
        now = self._clock()
        to = env.sender if target == "sender" else self.postmaster
        if not self._limiter.allow(to, now):
            log.warning(
                "%s: %s %s notification to <%s> suppressed: more than %d notices in %g s"
                " (queue.notice_rate_limit)",
                message.queue_id, target, _label(kind), to, self._limiter.limit,
                self._limiter.window,
            )  # fmt: skip
            return None
        results = [self._result(s, kind, now) for s in states]
        with message.open() as original:
            report = build_dsn(
                reporting_mta=self.hostname,
                original_envelope=env,
                queue_id=message.queue_id,
                arrival_time=message.arrival,
                now=now,
                recipients=results,
                kind=kind,
                original_message=original,
                return_content=return_content_for(env, kind),
                postmaster_address=self.postmaster,
            )
        crash_point("bounce_built")
        sender = "" if target == "sender" else self.double_bounce_sender
        envelope = Envelope(
            sender=sender,
            recipients=(RecipientSpec(to),),
            body_type="7BIT" if report.isascii() else "8BITMIME",
            smtputf8=env.smtputf8,
            protocol="local",
        )
        writer = self._spool.new_message()
        writer.write(report)
        outcome = await self._intake().submit(writer, envelope)
        if isinstance(outcome, Refused) and outcome.reply.code < 500:
            # A full spool (452): fail the hook so the runner keeps the message and the
            # report is tried again, instead of a report lost with a removed message.
            raise OSError(f"{message.queue_id}: report not queued: {outcome.reply.one_line()}")
        crash_point("bounce_queued")
        qid = getattr(outcome, "queue_id", None)
        label = {"sender": "sender", "postmaster": "postmaster"}[target]
        log.info("%s: %s %s notification: %s", message.queue_id, label, _label(kind), qid)
        return qid

    def _result(self, state: RecipientState, kind: DsnKind, now: float) -> RecipientResult:
        action = _ACTIONS[kind]
        if kind == "success" and state.last_relay and state.last_relay != "local":
            action = "relayed"  # handed to a host that may not report further (RFC 3464 §2.3.3)
        reply = state.last_reply
        # a host name only when that host said the reply (`scheduler.outcome` stores "none"
        # for our own words: connection refused, timeouts, DNS failures)
        remote = None
        if "[" in (state.last_relay or ""):
            name, _, rest = (state.last_relay or "").partition("[")
            remote = name or rest.partition("]")[0]
        if reply is None:
            return RecipientResult(
                final_recipient=state.address,
                action=action,
                status="5.0.0" if kind in ("failure", "expired") else "2.0.0",
                original_recipient=state.orcpt,
                last_attempt=state.last_attempt,
            )
        result = RecipientResult.from_reply(
            state.address,
            reply,
            action,
            original_recipient=state.orcpt,
            remote_mta=remote,
            last_attempt=state.last_attempt or now,
        )
        if kind in ("failure", "expired") and not reply.is_permanent:
            # Expired after temporary failures: the status becomes permanent (5.x.x), the
            # diagnostic keeps the last reply as it was (Postfix does the same).
            result = replace(result, status="5" + result.status[1:])
        return result


_ACTIONS: dict[DsnKind, Action] = {
    "failure": "failed",
    "expired": "failed",
    "delay": "delayed",
    "success": "delivered",
}


def _kind(state: RecipientState) -> DsnKind:
    reply = state.last_reply
    return "expired" if reply is not None and not reply.is_permanent else "failure"


def _label(kind: DsnKind) -> str:
    return {
        "failure": "non-delivery",
        "expired": "non-delivery",
        "delay": "delay",
        "success": "delivery",
    }[kind]
