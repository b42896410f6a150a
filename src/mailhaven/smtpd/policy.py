"""What the receive role *welcomes*: the policy answers to the SMTP core's decisions.

The core has already checked syntax and sequence; this module decides acceptance: which
recipients we take (local users, aliases, relay permission through `routing.Router`), whether a
sender may be used (submission: authentication required first, RFC 6409 §4.1), what VRFY and
EXPN reveal (nothing by default: no user enumeration), and ETRN.

Pure and synchronous: it takes the session facts and the event and returns `None` (accept) or a
`Reply`. Anything slow (password checks, queue commits) is the session's async business.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mailhaven.proto import replies as r
from mailhaven.proto import smtp_server_events as ev
from mailhaven.proto.replies import Reply
from mailhaven.routing.router import Router


@dataclass(slots=True)
class SessionFacts:
    """What we know about the client; the policy reads it, the session keeps it current."""

    client_ip: str
    client_name: str = "unknown"
    helo: str = ""
    tls: str | None = None
    auth_user: str | None = None
    #: SIZE= of the current MAIL FROM (RFC 1870), None when not declared: the quota check at
    #: RCPT uses it
    declared_size: int | None = None


@dataclass(frozen=True, slots=True)
class PolicySettings:
    #: Submission listeners (RFC 6409): MAIL needs AUTH first.
    require_auth: bool = False
    #: VRFY answers 252 without looking anything up (Postfix: disable_vrfy_command).
    vrfy_reveals: bool = False
    expn_enabled: bool = False
    #: An authenticated user may only send as its own addresses and aliases (Postfix's
    #: reject_authenticated_sender_login_mismatch); on by default for submission.
    sender_login_check: bool = False


class SMTPPolicy:
    """Policy for one listener kind; the router is fetched per call so reloads apply at once."""

    def __init__(
        self,
        router: Callable[[], Router],
        settings: PolicySettings,
        *,
        mailbox_full: Callable[[str, int | None], Reply | None] | None = None,
    ) -> None:
        self._router = router
        self.settings = settings
        #: the quota check (`checks.mailbox_full`): 452 4.2.2 for a mailbox known to be full
        self.mailbox_full = mailbox_full

    def mail_from(self, facts: SessionFacts, event: ev.MailFrom) -> Reply | None:
        facts.declared_size = event.params.size
        if self.settings.require_auth and facts.auth_user is None:
            return r.AUTH_REQUIRED
        user = facts.auth_user
        checked = user is not None and self.settings.sender_login_check and event.address
        if checked and user is not None and not self._owns(user, event.address):
            return r.sender_not_owned(event.address, user)
        return None

    def _owns(self, user: str, address: str) -> bool:
        """`address` is in a local domain and is `user` or an alias delivering to `user`."""
        router = self._router()
        domain = address.rpartition("@")[2]
        if not router.is_local_domain(domain):
            return False
        for final in router.expand(address):
            if "@" in user:  # a virtual user: the mailbox the address reaches is the user's
                route = router.route(final)
                if route.transport == "local" and route.nexthop == user:
                    return True
                continue
            local = final.rpartition("@")[0].lower()
            if local == user or local.split("+", 1)[0] == user:
                return True
        return False

    def rcpt_to(self, facts: SessionFacts, event: ev.RcptTo) -> Reply | None:
        refusal = self._router().check_recipient(
            event.address, client_ip=facts.client_ip, authenticated=facts.auth_user is not None
        )
        if refusal is None and self.mailbox_full is not None:
            return self.mailbox_full(event.address, facts.declared_size)
        return refusal

    def verify(self, facts: SessionFacts, event: ev.Verify) -> Reply:
        arg = event.argument.strip("<>")
        if self.settings.vrfy_reveals:
            refusal = self._router().check_recipient(arg, client_ip="", authenticated=True)
            if refusal is not None:
                return refusal
            return r.vrfy_address(arg)
        return r.CANNOT_VRFY

    def expand(self, facts: SessionFacts, event: ev.Expand) -> Reply:
        if not self.settings.expn_enabled:
            return r.EXPN_DISABLED
        targets = self._router().expand(event.argument.strip("<>"))
        if not targets:
            return r.NO_SUCH_LIST
        return r.expansion(tuple(targets))


def protocol_name(*, extended: bool, tls: bool, auth: bool, utf8: bool) -> str:
    """RFC 3848 / RFC 6531 `with` keywords for Received: and the envelope."""
    if not extended:
        return "SMTP"
    name = "UTF8SMTP" if utf8 else "ESMTP"
    return name + ("S" if tls else "") + ("A" if auth else "")
