"""The POP3 listener: accepts connections, runs one `Session` task each, shuts down gracefully.

In: where to listen and what to serve (mail root, user database, TLS context). Out: a
`Pop3Listener` the composition root keeps, with `close()` (stop accepting and ask every session
to end) and `wait_closed()` (wait for them, aborting stragglers after a grace period).

Port 995 is implicit TLS (RFC 8314 §3.3) and needs `implicit_tls=True`; port 110 offers STLS when
a TLS context is given (RFC 2595). Sessions in flight at shutdown get `-ERR [SYS/TEMP]` at their
next read and commit nothing, as RFC 1939 §6 requires for a session that did not QUIT.

SECURITY: at most `max_sessions` sessions run at once, at most `[limits] connections_per_ip` from
one client address, and at most `connection_rate` new ones per address per minute (the SMTP
limits, counted over every POP3 listener by one `ClientLimits`); more are told `-ERR [SYS/TEMP]`
and closed before any parsing. LOGIN-DELAY is kept over every listener too (one `LoginTimes`).
A session's failure is logged and contained in its own task, whose end releases its slot and
its address's count exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import Counter
from pathlib import Path

from mailhaven.checks.auth_failures import AuthLimiter
from mailhaven.checks.rates import RateCounter
from mailhaven.mailbox.owner import MailOwner
from mailhaven.mailbox.users import UserDB
from mailhaven.net.stream import TLS_HANDSHAKE_TIMEOUT, Stream
from mailhaven.pop3d.login_delay import LoginTimes
from mailhaven.pop3d.session import MIN_IDLE_TIMEOUT, Services, Session, Settings

log = logging.getLogger("mailhaven.pop3d")

#: Concurrent sessions per listener before new connections are turned away.
MAX_SESSIONS = 1000
#: How long `wait_closed` lets sessions finish (a RETR in flight) before aborting them.
SHUTDOWN_GRACE = 10.0


#: Postfix smtpd_client_connection_count_limit = 50, as `[limits] connections_per_ip`.
CONNECTIONS_PER_IP = 50


class ClientLimits:
    """Connections per client address and their rate (Postfix anvil's count and rate limits),
    shared by every POP3 listener of the process. `connection_rate` 0 is off."""

    def __init__(self, connections_per_ip: int = CONNECTIONS_PER_IP, connection_rate: int = 0):
        self.connections_per_ip = connections_per_ip
        self.rate = RateCounter(connection_rate)
        self.per_ip: Counter[str] = Counter()

    def admit(self, ip: str, now: float) -> str | None:
        """Count a new connection from `ip`; the refusal text when it is over a limit."""
        if self.per_ip[ip] >= self.connections_per_ip:
            return "Too many connections from your address, try again later"
        if not self.rate.allow(ip, now):
            return "Too many connections from your address, slow down"
        self.per_ip[ip] += 1
        return None

    def release(self, ip: str) -> None:
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]


class Pop3Listener:
    def __init__(
        self, services: Services, max_sessions: int, clients: ClientLimits | None = None
    ) -> None:
        self.services = services
        self.max_sessions = max_sessions
        self.clients = clients or ClientLimits()
        self.server: asyncio.Server | None = None
        self.sessions: dict[Session, asyncio.Task[None]] = {}

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    def _accept(self, stream: Stream) -> None:
        if len(self.sessions) >= self.max_sessions:
            log.warning("too many sessions (%d): refusing %s", self.max_sessions,
                        stream.extra("peername"))
            stream.write(b"-ERR [SYS/TEMP] Too many connections, try again later\r\n")
            stream.close()
            return
        loop = asyncio.get_running_loop()
        session = Session(stream, self.services)
        refusal = self.clients.admit(session.rip, loop.time())
        if refusal is not None:
            log.warning("%s: rip=%s", refusal, session.rip)
            stream.write(f"-ERR [SYS/TEMP] {refusal}\r\n".encode())
            stream.close()
            return
        task = loop.create_task(session.run(), name=f"pop3-{session.id}")
        self.sessions[session] = task
        task.add_done_callback(lambda _: self._release(session))

    def _release(self, session: Session) -> None:
        if self.sessions.pop(session, None) is not None:
            self.clients.release(session.rip)

    def close(self) -> None:
        """Stop listening and ask every session to end at its next read."""
        if self.server is not None:
            self.server.close()
        for session in list(self.sessions):
            session.stop()

    async def wait_closed(self, grace: float = SHUTDOWN_GRACE) -> None:
        if self.server is not None:
            await self.server.wait_closed()
        tasks = list(self.sessions.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for session, task in list(self.sessions.items()):
            if task in pending:
                session.stream.abort()
                task.cancel()
        if pending:
            await asyncio.wait(pending)


async def start_pop3_server(
    host: str | None,
    port: int,
    *,
    sock: socket.socket | None = None,
    mail_root: Path,
    users: UserDB,
    tls_context: ssl.SSLContext | None,
    implicit_tls: bool,
    allow_plaintext_on_loopback: bool,
    hostname: str,
    idle_timeout: float = MIN_IDLE_TIMEOUT,
    tls_handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT,
    limiter: AuthLimiter | None = None,
    max_sessions: int = MAX_SESSIONS,
    clients: ClientLimits | None = None,
    login_delay: int = 0,
    expire: str = "",
    owner: MailOwner | None = None,
    logins: LoginTimes | None = None,
) -> Pop3Listener:
    """Listen for POP3 and serve until `close()`; see the module docstring."""
    if implicit_tls and tls_context is None:
        raise ValueError("implicit TLS needs a TLS context")
    if idle_timeout < MIN_IDLE_TIMEOUT:
        log.warning("idle_timeout %.0fs is below RFC 1939's 10 minutes", idle_timeout)
    settings = Settings(mail_root, hostname, tls_context, implicit_tls,
                        allow_plaintext_on_loopback, idle_timeout, tls_handshake_timeout,
                        login_delay, expire, owner)
    services = Services(settings, users, limiter or AuthLimiter(),
                        logins=LoginTimes() if logins is None else logins)
    listener = Pop3Listener(services, max_sessions, clients)
    loop = asyncio.get_running_loop()
    tls = tls_context if implicit_tls else None
    handshake = tls_handshake_timeout if implicit_tls else None
    if sock is not None:  # bound before the privilege drop, or inherited from systemd
        listener.server = await loop.create_server(
            lambda: Stream(listener._accept), sock=sock, ssl=tls, ssl_handshake_timeout=handshake
        )
    else:
        listener.server = await loop.create_server(
            lambda: Stream(listener._accept),
            host,
            port,
            ssl=tls,
            ssl_handshake_timeout=handshake,
            reuse_address=True,
        )
    shown = sock.getsockname()[0] if sock is not None else host
    log.info("listening on %s port %d (%s)", shown or "*", listener.port,
             "implicit TLS" if implicit_tls else "STLS" if tls_context else "plaintext")
    return listener
