"""Turning an agent's per-recipient replies into stored verdicts and maillog lines (pure).

2xx: sent. 5xx: bounced. 4xx, a missing reply or an agent exception: deferred until the backoff
time, unless the message is past its queue lifetime: then bounced ("expired"), keeping the last
temporary reply for the DSN (Postfix reports the last error with Action: failed).

Relay names: a `Reply` has no room for "which host took it", so an agent names it in its
`DeliveryResult` (`relay_host`, e.g. "mx1.example.org[192.0.2.1]:25"). When an agent raised
instead, the log says `relay=local` for the local transport and `relay=none` otherwise.

The text in `status=S (text)` follows Postfix's smtp(8) (smtp_proto.c). A reply a remote server
sent (`Reply.answered` set) is quoted whole, code and enhanced code first: `250 2.0.0 Ok: queued
as X`; a refusal also names the host, without the port, and the command it answered:
`host mx.example[192.0.2.1] said: 550 5.1.1 <bob@x>: Recipient address rejected (in reply to
RCPT TO command)`, or `host H refused to talk to me: 554 ...` for the greeting, EHLO or HELO.
Our own words (connection refused, DNS failure, `delivered to maildir`, `delivery temporarily
suspended: ...`) are logged as they are, like Postfix's `connect to host[ip]:port: ...`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from mailhaven.proto.replies import Reply
from mailhaven.routing.route import Route
from mailhaven.scheduler.backoff import BackoffPolicy, expired, next_attempt
from mailhaven.spool.records import DueRecipient, RecipientUpdate, Status

Label = Literal["sent", "bounced", "deferred", "expired"]

NO_RESULT = Reply(451, "delivery agent returned no result for this recipient", "4.3.0")
UNAVAILABLE = Reply(451, "mail transport unavailable", "4.3.0")


@dataclass(frozen=True, slots=True)
class Verdict:
    recipient: DueRecipient
    reply: Reply
    label: Label
    update: RecipientUpdate


def crash_reply(exc: BaseException) -> Reply:
    """An agent raised: unknown errors count as temporary (the mail is never lost)."""
    return Reply(451, f"delivery agent failed: {type(exc).__name__}: {exc}"[:300], "4.3.0")


def judge(
    recipients: Sequence[DueRecipient],
    replies: Mapping[str, Reply],
    *,
    policy: BackoffPolicy,
    now: float,
    null_sender: bool,
    attempted: bool = True,
    relay: str | None = None,
    notify_passed: frozenset[str] = frozenset(),
) -> list[Verdict]:
    """One verdict per recipient, in order; `relay` is stored for the DSN's Remote-MTA;
    `notify_passed` names the recipients whose NOTIFY=SUCCESS the next hop took over."""
    out = []
    for rcpt in recipients:
        r = replies.get(rcpt.address, NO_RESULT)
        label: Label
        when = None
        if r.is_success:
            label, status = "sent", Status.SENT
        elif r.is_permanent:
            label, status = "bounced", Status.BOUNCED
        elif expired(policy, rcpt.arrival, now, null_sender=null_sender):
            label, status = "expired", Status.BOUNCED
        else:
            label, status = "deferred", Status.DEFERRED
            when = next_attempt(policy, rcpt.arrival, now)
        update = RecipientUpdate(
            rcpt.index, status, when, r, attempted, _teller(r, relay),
            notify_passed=r.is_success and rcpt.address in notify_passed,
        )  # fmt: skip
        out.append(Verdict(rcpt, r, label, update))
    return out


def _teller(r: Reply, relay: str | None) -> str | None:
    """The relay to store with reply `r`: the host only when that host said it. Our own words
    (connection refused, timed out, TLS failed) are stored with relay "none", so the DSN has no
    Remote-MTA and reads "connect to ...", never "host H said: ..." (RFC 3464 §2.3.5: the
    Remote-MTA is the one that reported the status)."""
    if relay is None or relay == "local" or r.answered is not None:
        return relay
    return "none"


def relay_without_result(route: Route) -> str:
    """The relay logged when the agent gave no `DeliveryResult` (it raised)."""
    return "local" if route.transport == "local" else "none"


#: Replies to these refuse the session itself: Postfix's "host H refused to talk to me".
_HELLO = frozenset({"greeting", "EHLO", "HELO"})


def status_text(r: Reply, relay: str) -> str:
    """The text of `status=S (...)` for reply `r` from `relay` (see the module docstring)."""
    if r.answered is None:  # our own words
        return " ".join(x for x in r.lines if x) or str(r.code)
    enhanced = f"{r.enhanced} " if r.enhanced else ""
    last = len(r.lines) - 1  # a multi-line reply reads as on the wire, as Postfix logs it
    said = " ".join(
        f"{r.code}{' ' if i == last else '-'}{enhanced}{line}".rstrip()
        for i, line in enumerate(r.lines)
    )
    host = _host(relay)
    if r.is_success or host is None:
        return said
    if r.answered in _HELLO:
        return f"host {host} refused to talk to me: {said}"
    return f"host {host} said: {said} (in reply to {r.answered} command)"


def _host(relay: str) -> str | None:
    """`mx.example[192.0.2.1]:25` -> `mx.example[192.0.2.1]`; None for `none` and `local`."""
    if "[" not in relay:
        return None
    return relay[: relay.rindex("]") + 1] if "]" in relay else relay


def _secs(x: float) -> str:
    return f"{max(x, 0.0):.2f}".rstrip("0").rstrip(".") or "0"


def attempt_line(
    queue_id: str,
    verdict: Verdict,
    *,
    relay: str,
    now: float,
    delays: tuple[float, float, float, float],
) -> str:
    """`QID: to=<a>, orig_to=<b>, relay=..., delay=.., delays=a/b/c/d, dsn=.., status=..`.

    delays: a = arrival to this attempt's planning (time queued), b = planning to the agent
    call (loading the message), c = connection set-up (0: agents do not report it yet),
    d = the agent's own time.
    """
    rcpt = verdict.recipient
    orig = f", orig_to=<{rcpt.original}>" if rcpt.original != rcpt.address else ""
    status = "deferred" if verdict.label == "expired" else verdict.label
    text = status_text(verdict.reply, relay)
    return (
        f"{queue_id}: to=<{rcpt.address}>{orig}, relay={relay},"
        f" delay={_secs(now - rcpt.arrival)}, delays={'/'.join(_secs(d) for d in delays)},"
        f" dsn={verdict.reply.dsn}, status={status} ({text})"
    )
