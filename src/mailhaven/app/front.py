"""The front of the process: what every listener shares, kept across reloads.

The login limiter (SMTP AUTH and POP3 count failures together), the SMTP authenticator, POP3's
per-client connection limits and its LOGIN-DELAY table, the certificate (`ReloadableTLS`, none
without one) and the SMTP listeners' profiles; once serving, the listening sockets and the POP3
listeners. A reload
changes their settings in place (`reconfigure`): counters survive it, so a SIGHUP never gives a
password guesser or a connection flood a fresh start.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable

from mailhaven.app.listeners import Bound, Profiles, reconfigure_pop3, start_listeners
from mailhaven.app.live import Live
from mailhaven.checks.auth_failures import AuthLimiter
from mailhaven.checks.services import CheckServices
from mailhaven.config import Config
from mailhaven.mailbox.users import UserDB
from mailhaven.net.tls import ReloadableTLS
from mailhaven.pop3d.login_delay import LoginTimes
from mailhaven.pop3d.server import ClientLimits, Pop3Listener
from mailhaven.smtpd.auth import SMTPAuthenticator
from mailhaven.smtpd.server import SMTPService


class Front:
    """The listeners' shared parts (see the module docstring)."""

    def __init__(self, live: Live, checks: CheckServices) -> None:
        self.live = live
        limits = live.config.limits
        self.limiter = AuthLimiter(
            max_failures=limits.auth_failures,
            max_address_failures=limits.auth_address_failures,
            failure_delay=limits.auth_failure_delay,
        )
        self.authenticator = SMTPAuthenticator(live.users, self.limiter)
        #: per-address connection counts and rates over every POP3 listener (`[limits]`)
        self.pop3_clients = ClientLimits(limits.connections_per_ip, limits.connection_rate)
        #: LOGIN-DELAY over every POP3 listener: the delay is per user, not per port
        self.pop3_logins = LoginTimes()
        self.tls: ReloadableTLS | None = None
        self.profiles = Profiles(live, lambda: self.tls, self.authenticator, checks=checks)
        #: the listening sockets per listener name, bound (or inherited) before the drop
        self.bound: Bound = {}
        #: the `smtp` listening sockets, which worker processes share
        self.smtp_sockets: list[socket.socket] = []
        self.pop3: list[Pop3Listener] = []

    async def serve(self, smtp: SMTPService) -> None:
        """Serve on every bound socket (`listeners.start_listeners`)."""
        self.smtp_sockets, self.pop3 = await start_listeners(
            self.bound, smtp, self.profiles, self.live, has_tls=self.tls is not None,
            limiter=self.limiter, pop3_clients=self.pop3_clients, pop3_logins=self.pop3_logins,
        )

    def reconfigure(self, config: Config, users: UserDB) -> None:
        """A reload: new profiles at the next connection, logins against the new users file
        (the old UserDB would keep accepting users no longer in it), new limits; the counts
        so far are kept."""
        self.profiles.forget()
        self.authenticator.users = users
        reconfigure_pop3(self.pop3, config, users)
        self.limiter.max_failures = config.limits.auth_failures
        self.limiter.max_address_failures = config.limits.auth_address_failures
        self.limiter.failure_delay = config.limits.auth_failure_delay
        self.pop3_clients.connections_per_ip = config.limits.connections_per_ip
        self.pop3_clients.rate.limit = config.limits.connection_rate

    def close_pop3(self, grace: float) -> list[Awaitable[None]]:
        """Stop accepting POP3 connections; what to await for the sessions to finish."""
        for listener in self.pop3:
            listener.close()
        return [listener.wait_closed(grace) for listener in self.pop3]
