"""The bounce role: turns the scheduler's verdicts into delivery status notifications.

In: a finished message and its recipients that failed for good (the scheduler's `on_failures`
hook), or recipients delivered with NOTIFY=SUCCESS. Out: an RFC 3464 report built by
`bounce.build_dsn`, queued through intake like any other message.

Loop safety (RFC 5321 §4.5.5, §6.1): reports go out with the null sender, so a failing report
is never bounced back to anybody; if a null-sender message fails, one copy goes to the
postmaster from `double-bounce@<hostname>` (Postfix's double bounce), and if *that* fails it is
only logged. NOTIFY=NEVER and the NOTIFY list are respected per recipient.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from mailhaven.bounce import (
    Action,
    DsnKind,
    RecipientResult,
    bounce_target,
    build_dsn,
    return_content_for,
    should_notify,
)
from mailhaven.envelope import Envelope, RecipientSpec
from mailhaven.intake import Intake
from mailhaven.spool.records import RecipientState, StoredMessage
from mailhaven.spool.store import Spool

log = logging.getLogger("mailhaven.bounce")


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
    ) -> None:
        self._spool = spool
        self._intake = intake
        self.hostname = hostname
        self.postmaster = postmaster
        self.double_bounce_sender = f"double-bounce@{hostname}"
        self._clock = clock

    async def on_failures(self, message: StoredMessage, failed: Sequence[RecipientState]) -> None:
        """The scheduler's hook: bounce the failed recipients the sender wants to hear about."""
        failures = [s for s in failed if should_notify(s.notify, _kind(s))]
        if not failures:
            return
        kind: DsnKind = "expired" if all(_kind(s) == "expired" for s in failures) else "failure"
        await self.notify(message, failures, kind)

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
        to = env.sender if target == "sender" else self.postmaster
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
        qid = getattr(outcome, "queue_id", None)
        label = {"sender": "sender", "postmaster": "postmaster"}[target]
        log.info("%s: %s %s notification: %s", message.queue_id, label, _label(kind), qid)
        return qid

    def _result(self, state: RecipientState, kind: DsnKind, now: float) -> RecipientResult:
        action = _ACTIONS[kind]
        reply = state.last_reply
        remote = (
            state.last_relay.split("[")[0]
            if state.last_relay and state.last_relay != "local"
            else None
        )
        if reply is None:
            return RecipientResult(
                final_recipient=state.address,
                action=action,
                status="5.0.0" if kind in ("failure", "expired") else "2.0.0",
                original_recipient=state.orcpt,
                last_attempt=state.last_attempt,
            )
        status_reply = reply
        if kind in ("failure", "expired") and not reply.is_permanent:
            # Expired after temporary failures: report the last temporary status as a 5.x.x.
            dsn = reply.dsn
            status_reply = type(reply)(reply.code, reply.text, "5" + dsn[1:], reply.more)
        result = RecipientResult.from_reply(
            state.address,
            status_reply,
            action,
            original_recipient=state.orcpt,
            remote_mta=remote,
            last_attempt=state.last_attempt or now,
        )
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
