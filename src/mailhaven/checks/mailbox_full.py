"""Refuse a recipient at RCPT time when its mailbox is known to be over quota (`452 4.2.2`).

Dovecot's LMTP does the same with `lmtp_rcpt_check_quota = yes`: the sending MTA keeps the
message and retries, instead of us accepting it only to defer it in our own queue. "Known" means
cheaply known: only a trustworthy `maildirsize` is read (a few hundred bytes, on the event loop);
when it is missing or would need recalculating, the answer is "accept", and delivery checks the
quota properly (in a worker thread) and defers if need be.

In: the recipient as written and the SIZE= the client declared (None: not declared; then only a
mailbox already at its limit is refused). Out: None (accept) or the `Reply`.

Only a recipient that routes to exactly one local mailbox is judged: for an alias with several
targets one full mailbox must not cost the others their copy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mailhaven.mailbox import quota
from mailhaven.mailbox.maildir import mailbox_path
from mailhaven.proto.replies import Reply, recipient_mailbox_full
from mailhaven.routing.router import Router


class MailboxFull:
    """The RCPT check; rules and router are fetched per call so a reload applies at once."""

    def __init__(
        self,
        router: Callable[[], Router],
        rules: Callable[[], quota.QuotaRules],
        mail_root: Path,
    ) -> None:
        self._router = router
        self._rules = rules
        self._root = mail_root

    def __call__(self, address: str, size: int | None) -> Reply | None:
        rules = self._rules()
        if not rules.enabled:
            return None
        router = self._router()
        finals = router.expand(address)
        if len(finals) != 1:
            return None
        route = router.route(finals[0])
        if route.transport != "local":
            return None
        limit = rules.limit_for(route.nexthop, finals[0].rpartition("@")[2] or None)
        if limit.unlimited:
            return None
        try:
            used = quota.read(mailbox_path(self._root, route.nexthop), limit)
        except (OSError, ValueError):
            return None
        if used is None or used.fits(limit, size or 1):
            return None
        return recipient_mailbox_full(address)
