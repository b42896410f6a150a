"""The POP3 listener: accepts connections, runs one `Session` task each, shuts down gracefully.

In: where to listen and what to serve (mail root, user database, TLS context). Out: a
`Pop3Listener` the composition root keeps, with `close()` (stop accepting and ask every session
to end) and `wait_closed()` (wait for them, aborting stragglers after a grace period).

Port 995 is implicit TLS (RFC 8314 §3.3) and needs `implicit_tls=True`; port 110 offers STLS when
a TLS context is given (RFC 2595). Sessions in flight at shutdown get `-ERR [SYS/TEMP]` at their
next read and commit nothing, as RFC 1939 §6 requires for a session that did not QUIT.

SECURITY: at most `max_sessions` sessions run at once; more are told `-ERR [SYS/TEMP]` and closed
before any parsing. A session's failure is logged and contained in its own task.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

from mailhaven.auth_limiter import AuthLimiter
from mailhaven.mailbox.users import UserDB
from mailhaven.pop3d.session import MIN_IDLE_TIMEOUT, Services, Session, Settings
from mailhaven.pop3d.stream import TLS_HANDSHAKE_TIMEOUT, Stream

log = logging.getLogger("mailhaven.pop3d")

#: Concurrent sessions per listener before new connections are turned away.
MAX_SESSIONS = 1000
#: How long `wait_closed` lets sessions finish (a RETR in flight) before aborting them.
SHUTDOWN_GRACE = 10.0


class Pop3Listener:
    def __init__(self, services: Services, max_sessions: int) -> None:
        self.services = services
        self.max_sessions = max_sessions
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
        session = Session(stream, self.services)
        task = asyncio.get_running_loop().create_task(session.run(), name=f"pop3-{session.id}")
        self.sessions[session] = task
        task.add_done_callback(lambda _: self.sessions.pop(session, None))

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
    mail_root: Path,
    users: UserDB,
    tls_context: ssl.SSLContext | None,
    implicit_tls: bool,
    allow_plaintext_on_loopback: bool,
    hostname: str,
    idle_timeout: float = MIN_IDLE_TIMEOUT,
    limiter: AuthLimiter | None = None,
    max_sessions: int = MAX_SESSIONS,
) -> Pop3Listener:
    """Listen for POP3 and serve until `close()`; see the module docstring."""
    if implicit_tls and tls_context is None:
        raise ValueError("implicit TLS needs a TLS context")
    if idle_timeout < MIN_IDLE_TIMEOUT:
        log.warning("idle_timeout %.0fs is below RFC 1939's 10 minutes", idle_timeout)
    settings = Settings(mail_root, hostname, tls_context, implicit_tls,
                        allow_plaintext_on_loopback, idle_timeout)
    listener = Pop3Listener(Services(settings, users, limiter or AuthLimiter()), max_sessions)
    loop = asyncio.get_running_loop()
    listener.server = await loop.create_server(
        lambda: Stream(listener._accept),
        host,
        port,
        ssl=tls_context if implicit_tls else None,
        ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if implicit_tls else None,
        reuse_address=True,
    )
    log.info("listening on %s port %d (%s)", host or "*", listener.port,
             "implicit TLS" if implicit_tls else "STLS" if tls_context else "plaintext")
    return listener
