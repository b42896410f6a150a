"""SMTP AUTH (RFC 4954): runs a SASL exchange against the user database, with rate limiting.

The SASL parsing is `proto.sasl` (pure); the password check is `UserDB.verify` (argon2id in a
thread); the brute-force brake is `auth_limiter.AuthLimiter`, shared with POP3 so a client that
guesses on one protocol is slowed on both; it counts per (address, normalised user) and per
address, so a guesser cannot lock the user out elsewhere. An address with recent failures waits
its back-off before each AUTH is looked at (in this session's task only). Every failure is
answered `535 5.7.8` after a delay (never a silent disconnect); a blocked client or user gets
`454 4.7.0` without any hash being computed. Successes and failures are logged like Postfix
(`sasl_method=`, `sasl_username=`). Users log in with their full address in any case, or a
bare name where there is one local domain (`UserDB.login_name`); the name logged and handed to
the session is the canonical full address.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from mailhaven.checks.auth_failures import AuthLimiter
from mailhaven.mailbox.users import UserDB
from mailhaven.maillog import client_label
from mailhaven.proto import replies as r
from mailhaven.proto.replies import Reply
from mailhaven.proto.sasl import Challenge, Credentials, Failure, SaslExchange, smtp_reply
from mailhaven.smtpd.policy import SessionFacts

log = logging.getLogger("mailhaven.smtpd")


class SMTPAuthenticator:
    """Starts one `_Exchange` per AUTH command."""

    def __init__(
        self,
        users: UserDB,
        limiter: AuthLimiter,
        *,
        mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN"),
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.users = users
        self.limiter = limiter
        self.mechanisms = mechanisms
        self._clock = clock

    def now(self) -> float:
        return self._clock() if self._clock else asyncio.get_running_loop().time()

    def start(self, facts: SessionFacts, mechanism: str, initial: str | None) -> _Exchange:
        return _Exchange(self, facts, mechanism, initial)


class _Exchange:
    def __init__(
        self, auth: SMTPAuthenticator, facts: SessionFacts, mechanism: str, initial: str | None
    ) -> None:
        self.auth = auth
        self.facts = facts
        self.mechanism = mechanism
        self.initial = initial
        self.sasl = SaslExchange(offered=auth.mechanisms)
        self.started = False

    async def respond(self, line: str | None) -> str | tuple[Reply, str | None]:
        if not self.started:
            self.started = True
            step = self.sasl.start(self.mechanism, self.initial)
        else:
            step = self.sasl.respond(line or "")
        match step:
            case Challenge():
                return step.encoded
            case Failure():
                return smtp_reply(step), None
            case Credentials():
                return await self._verify(step)

    async def _verify(self, cred: Credentials) -> tuple[Reply, str | None]:
        auth, ip = self.auth, self.facts.client_ip
        client = client_label(ip, self.facts.client_name)
        # One canonical name for the limiter and the lookup (the full address; a bare name
        # where it is unambiguous); a name that can be no user's is counted against the
        # address alone.
        name = auth.users.login_name(cred.authcid)
        user = name or cred.authcid  # the log line escapes what the client sent
        await asyncio.sleep(auth.limiter.penalty(ip, auth.now()))
        verdict = auth.limiter.check(ip, name, auth.now())
        if not verdict.allowed:
            log.warning(
                "%s: SASL %s authentication blocked for %s: too many failures",
                client,
                self.mechanism,
                user,
            )
            await asyncio.sleep(auth.limiter.failure_delay)
            return r.AUTH_BLOCKED, None
        auth.users.reload_if_changed()
        if name is not None and await auth.users.verify(name, cred.password):
            auth.limiter.succeeded(ip, name, auth.now())
            log.info("%s: sasl_method=%s, sasl_username=%s", client, self.mechanism, name)
            return r.AUTH_OK, name
        if name is None:
            await auth.users.verify("", cred.password)  # the same work as a wrong password
        auth.limiter.failed(ip, name, auth.now())
        log.warning("%s: SASL %s authentication failed: user=%s", client, self.mechanism, user)
        await asyncio.sleep(auth.limiter.failure_delay)
        return r.AUTH_FAILED, None
