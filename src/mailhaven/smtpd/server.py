"""The receive role's listeners: accept connections, enforce connection limits and timeouts,
and stop gracefully.

One `SMTPService` serves every SMTP listener (MX, submission, submissions), so the connection
limits (`limits.connections` in all, `limits.connections_per_ip` per client address) are shared,
like Postfix's anvil. Idle timeouts, and the deadlines for a whole command line and a whole
message (which a client trickling bytes within the idle timeout would otherwise stretch without
end), are enforced by one reaper task that looks at every session once a second, instead of a
timer per connection (cheaper for 10,000 idle clients).

Shutdown (SIGTERM): stop accepting, answer 421 to sessions that are between transactions, let
transactions in flight finish until `timeouts.shutdown_grace`, then cut the rest with 421.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import Counter
from collections.abc import Callable

from mailhaven.checks.rates import RateCounter
from mailhaven.config import Limits, Timeouts, parse_hostport
from mailhaven.net.client_names import ClientNames
from mailhaven.proto import replies as r
from mailhaven.proto.replies import Reply
from mailhaven.smtpd.profile import ListenerProfile, MessageSink
from mailhaven.smtpd.session import SMTPSession

log = logging.getLogger("mailhaven.smtpd")

REAPER_INTERVAL = 1.0


class SMTPService:
    """Listeners plus the shared bookkeeping of all SMTP sessions."""

    def __init__(
        self,
        *,
        sink: MessageSink,
        limits: Limits,
        timeouts: Timeouts,
        loop: asyncio.AbstractEventLoop | None = None,
        storage: Callable[[int], Reply | None] | None = None,
        client_names: ClientNames | None = None,
    ) -> None:
        self.sink = sink
        #: `452 4.3.1` when the queue's disk is (nearly) full for a message of N bytes
        self.storage = storage
        #: FCrDNS of each client before its greeting; None: every client is `unknown`
        self.client_names = client_names
        self.limits = limits
        self.timeouts = timeouts
        self.loop = loop or asyncio.get_running_loop()
        self.sessions: set[SMTPSession] = set()
        self.per_ip: Counter[str] = Counter()
        self.shutting_down = False
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Future[None]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self.connection_rate = RateCounter(limits.connection_rate)
        self.message_rate = RateCounter(limits.message_rate)

    def reconfigure(self, limits: Limits, timeouts: Timeouts) -> None:
        """New limits and timeouts (a reload) for new connections and the next checks; the
        rate counters keep what they counted so far."""
        self.limits, self.timeouts = limits, timeouts
        self.connection_rate.limit = limits.connection_rate
        self.message_rate.limit = limits.message_rate

    # ------------------------------------------------------------------ listeners

    async def listen(
        self,
        address: str,
        profile: Callable[[], ListenerProfile],
        *,
        implicit_tls: bool = False,
        sock: socket.socket | None = None,
    ) -> asyncio.Server:
        """Start one listener; `profile` is read per connection, so a reload applies to new ones.
        With `sock` (a listening socket inherited from the daemon: a worker process) it
        serves that socket instead of binding `address`."""

        def factory() -> SMTPSession:
            return SMTPSession(self, profile())

        ssl_ctx = profile().tls_context() if implicit_tls else None
        handshake = self.timeouts.tls_handshake if ssl_ctx is not None else None
        if sock is not None:
            server = await self.loop.create_server(
                factory, sock=sock, ssl=ssl_ctx, ssl_handshake_timeout=handshake, backlog=1024
            )
        else:
            host, port = parse_hostport(address)
            server = await self.loop.create_server(
                factory,
                host,
                port,
                ssl=ssl_ctx,
                ssl_handshake_timeout=handshake,
                reuse_address=True,
                backlog=1024,
                family=socket.AF_INET6 if ":" in host else socket.AF_INET,
            )
        self._servers.append(server)
        if self._reaper is None:
            self._reaper = asyncio.ensure_future(self._reap())
        return server

    @property
    def addresses(self) -> list[tuple[str, int]]:
        out = []
        for server in self._servers:
            for sock in server.sockets:
                name = sock.getsockname()
                out.append((str(name[0]), int(name[1])))
        return out

    # ------------------------------------------------------------------ sessions

    def admit(self, session: SMTPSession) -> Reply | None:
        """Count a new connection; a refusal (421) when a limit is exceeded."""
        ip, hostname = session.facts.client_ip, session.profile.settings.hostname
        self.sessions.add(session)
        self.per_ip[ip] += 1
        if self.shutting_down:
            return r.shutting_down(hostname)
        if len(self.sessions) > self.limits.connections:
            return r.too_many_connections(hostname)
        if self.per_ip[ip] > self.limits.connections_per_ip:
            return r.too_many_connections_from(hostname, ip)
        if not self.connection_rate.allow(ip, self.loop.time()):
            return r.connection_rate_exceeded(hostname, ip)
        return None

    def message_allowed(self, ip: str) -> bool:
        """Per-client message rate (checked at MAIL FROM)."""
        return self.message_rate.allow(ip, self.loop.time())

    def forget(self, session: SMTPSession) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            ip = session.facts.client_ip
            self.per_ip[ip] -= 1
            if self.per_ip[ip] <= 0:
                del self.per_ip[ip]

    def track(self, task: asyncio.Future[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(REAPER_INTERVAL)
            now = self.loop.time()
            t = self.timeouts
            for session in list(self.sessions):
                if session._busy:  # a commit or handshake in flight is ours to finish
                    continue
                in_data = session.conn.in_body
                limit = t.data if in_data else t.command
                if now - session.last_activity > limit:
                    session.timeout()
                elif (
                    t.message_deadline
                    and session.message_started is not None
                    and now - session.message_started > t.message_deadline
                ):
                    session.timeout("message deadline exceeded")
                elif (
                    t.command_deadline
                    and not in_data
                    and now - session.waiting_since > t.command_deadline
                ):
                    session.timeout("command deadline exceeded")

    # ------------------------------------------------------------------ shutdown

    async def stop_accepting(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 0.1)
        self._servers.clear()

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, let transactions finish until `grace` seconds, then cut the rest."""
        self.shutting_down = True
        grace = self.timeouts.shutdown_grace if grace is None else grace
        for server in self._servers:
            server.close()
        for session in list(self.sessions):
            session.shutdown()
        deadline = self.loop.time() + grace
        while (self.sessions or self._tasks) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session.close_with(r.shutting_down(session.profile.settings.hostname))
        self._servers.clear()
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
