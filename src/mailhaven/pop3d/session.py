"""One POP3 session: drives the sans-I/O core (proto.pop3) over a Maildir (mailbox.maildrop).

In: a `Stream` (the connection), the shared `Services` (users, limiter, size cache, settings).
Out: answers to the client, the UPDATE commit at QUIT, and log lines on `mailhaven.pop3d`.

The core says what is legal; this module says what is welcome: it checks passwords (rate-limited
by `AuthLimiter`, failures answered with `-ERR [AUTH]` after a delay), takes the maildrop lock
(`-ERR [IN-USE]`), snapshots the Maildir, and streams RETR/TOP from disk chunk by chunk with
`drain()` between chunks, so a 10 MiB message never sits in memory.

Invariants: nothing is deleted unless the client sent QUIT in TRANSACTION; the maildrop lock is
released however the session ends; an unexpected exception answers `-ERR [SYS/TEMP]` and ends this
session only. Logs follow Dovecot's shape, one line per event, keyed by `session=<id>`:
    login: user=<alice>, method=PLAIN, rip=127.0.0.1, lip=127.0.0.1, TLS, session=<id>
    logout: user=<alice>, reason=QUIT, top=0/0, retr=2/1234, del=1/1, size=5678, session=<id>

SECURITY: the client is untrusted and may be anyone until `accept_login`. User names are
normalised and validated before they name a directory. Plaintext credentials are refused unless
TLS is active or the client is on loopback and the configuration allows it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import assert_never

from mailhaven.checks.auth_failures import AuthLimiter
from mailhaven.mailbox import layout
from mailhaven.mailbox.maildir import ensure_maildir
from mailhaven.mailbox.owner import MailOwner
from mailhaven.mailbox.users import UserDB
from mailhaven.net.stream import TLS_HANDSHAKE_TIMEOUT, Stream
from mailhaven.pop3d import maildrop as md
from mailhaven.pop3d.login_delay import LoginTimes
from mailhaven.proto import pop3

log = logging.getLogger("mailhaven.pop3d")

#: RFC 1939 §3: an inactivity autologout timer, if any, MUST be at least 10 minutes.
MIN_IDLE_TIMEOUT = 600.0


@dataclass(frozen=True, slots=True)
class Settings:
    mail_root: Path
    hostname: str
    tls_context: ssl.SSLContext | None
    implicit_tls: bool
    allow_plaintext_on_loopback: bool
    idle_timeout: float = MIN_IDLE_TIMEOUT
    tls_handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT
    #: RFC 2449 §6.5 LOGIN-DELAY: seconds between a user's logins (0: none, not announced)
    login_delay: int = 0
    #: RFC 2449 §6.7 EXPIRE as announced ("" not announced, "NEVER", or days)
    expire: str = ""
    #: owner and modes of a Maildir a login creates (`mailbox.owner`; None: the process's)
    owner: MailOwner | None = None

    def policy_capabilities(self) -> tuple[str, ...]:
        caps = (f"LOGIN-DELAY {self.login_delay}",) if self.login_delay else ()
        return caps + ((f"EXPIRE {self.expire}",) if self.expire else ())


@dataclass(slots=True)
class Services:
    """What every session of one listener shares (`limiter` and `logins`: of every listener)."""

    settings: Settings
    users: UserDB
    limiter: AuthLimiter
    sizes: md.SizeCache = field(default_factory=md.SizeCache)
    #: when each user last got in, for LOGIN-DELAY (`pop3d.login_delay`)
    logins: LoginTimes = field(default_factory=LoginTimes)


@dataclass(slots=True)
class Counters:
    top: int = 0
    top_octets: int = 0
    retr: int = 0
    retr_octets: int = 0

    def summary(self, drop: md.Maildrop | None, deleted: md.CommitResult | None) -> str:
        total = len(drop.messages) if drop else 0
        size = sum(m.size for m in drop.messages) if drop else 0
        dele = deleted.deleted if deleted else 0
        return (f"top={self.top}/{self.top_octets}, retr={self.retr}/{self.retr_octets}, "
                f"del={dele}/{total}, size={size}")


class Session:
    def __init__(self, stream: Stream, services: Services) -> None:
        self.stream = stream
        self.services = services
        self.settings = services.settings
        self.id = secrets.token_urlsafe(9)
        peer = stream.extra("peername") or ("?", 0)
        local = stream.extra("sockname") or ("?", 0)
        self.rip, self.lip = str(peer[0]), str(local[0])
        self.core = pop3.Connection(
            f"{self.settings.hostname} POP3 server ready",
            tls_available=self.settings.tls_context is not None,
            tls_active=self.settings.implicit_tls,
            insecure_auth=self.settings.allow_plaintext_on_loopback and _is_loopback(self.rip),
            policy=self.settings.policy_capabilities(),
        )
        self.user: str | None = None
        self.drop: md.Maildrop | None = None
        self.lock: md.MaildropLock | None = None
        self.counters = Counters()
        self.committed: md.CommitResult | None = None
        self.reason = "disconnected"

    async def run(self) -> None:
        try:
            await self._serve()
        except (ConnectionError, TimeoutError, ssl.SSLError) as exc:
            self.reason = f"connection error ({type(exc).__name__})"
        except Exception:
            log.exception("internal error: session=%s", self.id)
            self.reason = "internal error"
            self.core.close("Internal error, try again later", pop3.RespCode.SYS_TEMP)
            self.stream.write(self.core.data_to_send())
        finally:
            if self.lock is not None:
                self.lock.release()
            self._log_end()
            self.stream.close()

    def stop(self) -> None:
        """Graceful shutdown: end the session at its next read, without UPDATE."""
        self.stream.stop()

    async def _flush(self) -> None:
        self.stream.write(self.core.data_to_send())
        await self.stream.drain(self.settings.idle_timeout)

    async def _serve(self) -> None:
        core = self.core
        while True:
            event = core.next_event()  # may itself queue answers (CAPA, USER, errors...)
            if not isinstance(event, pop3.StartTls):  # no await between STLS and the swap
                await self._flush()
            match event:
                case pop3.Wait.NEED_DATA:
                    data = await self.stream.read(self.settings.idle_timeout)
                    if data is None:
                        stopping = self.stream.stopping
                        self.reason = "shutdown" if stopping else "idle timeout"
                        text = "Server shutting down" if stopping else "Disconnected for inactivity"
                        core.close(text, pop3.RespCode.SYS_TEMP)
                    else:
                        core.receive_data(data)
                case pop3.ConnectionClosed():
                    if core.bad_commands >= pop3.MAX_BAD_COMMANDS:
                        self.reason = "too many bad commands"
                    elif self.reason == "disconnected" and core.auth_failures:
                        self.reason = f"auth failed, {core.auth_failures} attempts"
                    await self._flush()
                    return
                case pop3.StartTls():
                    # Synchronous up to the protocol swap inside start_tls, so every byte that
                    # arrived before it is plaintext and gets discarded, and none after it is.
                    assert self.settings.tls_context is not None
                    self.stream.write(core.data_to_send())
                    core.tls_started()
                    await self.stream.start_tls(self.settings.tls_context, server_side=True,
                                                timeout=self.settings.tls_handshake_timeout)
                case pop3.Login():
                    await self._login(event)
                case pop3.Quit():
                    await self._quit()
                case (pop3.Stat() | pop3.ListMessages() | pop3.Uidl() | pop3.Dele()
                      | pop3.Rset()):
                    self._transaction(event)
                case pop3.Retr() | pop3.Top():
                    await self._send_message(event)
                case _:
                    assert_never(event)

    # -- AUTHORIZATION -------------------------------------------------------------------------
    async def _login(self, event: pop3.Login) -> None:
        services, loop = self.services, asyncio.get_running_loop()
        # the full address in any case, or a bare name where unambiguous (`UserDB.login_name`)
        name = services.users.login_name(event.user)
        # the address's back-off (Dovecot's auth penalty) holds this session only
        await asyncio.sleep(services.limiter.penalty(self.rip, loop.time()))
        verdict = services.limiter.check(self.rip, name, loop.time())
        good = (
            verdict.allowed
            and name is not None
            and (event.authzid == "" or services.users.login_name(event.authzid) == name)
            and await services.users.verify(name, event.password)
        )
        who = f"user=<{_printable(event.user)}>, method={event.mechanism}, rip={self.rip}"
        if not good:
            services.limiter.failed(self.rip, name, loop.time())
            why = "blocked" if not verdict.allowed else "auth failed"
            log.warning("login failed (%s): %s, session=%s", why, who, self.id)
            await asyncio.sleep(services.limiter.failure_delay)
            self.core.reject_login(pop3.RespCode.AUTH, "Authentication failed")
            return
        assert name is not None
        services.limiter.succeeded(self.rip, name, loop.time())
        who = f"user=<{name}>, method={event.mechanism}, rip={self.rip}"  # the canonical name
        delay = self.settings.login_delay
        if services.logins.too_soon(name, delay, loop.time()):
            log.warning("login refused (LOGIN-DELAY %ds): %s, session=%s", delay, who, self.id)
            self.core.reject_login(pop3.RespCode.LOGIN_DELAY, f"Wait {delay}s between logins")
            return
        path = _maildir(self.settings.mail_root, name)
        try:
            self.lock = await asyncio.to_thread(_lock_maildir, path, self.settings.owner)
            if self.lock is None:
                log.warning("login refused (mailbox in use): %s, session=%s", who, self.id)
                self.core.reject_login(pop3.RespCode.IN_USE, "Mailbox is locked by another session")
                return
            messages = await asyncio.to_thread(md.scan, path, services.sizes)
        except OSError as exc:
            log.error("cannot open maildrop %s: %s, session=%s", path, exc, self.id)
            if self.lock is not None:
                self.lock.release()
                self.lock = None
            self.core.reject_login(pop3.RespCode.SYS_TEMP, "Mailbox unavailable, try again later")
            return
        # only now, holding the lock: a login refused [IN-USE]/[SYS/TEMP] starts no delay
        services.logins.record(name, delay, loop.time())
        self.user, self.drop = name, md.Maildrop(path, messages)
        count, octets = self.drop.stat()
        tls = ", TLS" if self.core.tls_active else ""
        log.info("login: %s, lip=%s%s, session=%s", who, self.lip, tls, self.id)
        self.core.accept_login(f"Logged in, {count} messages ({octets} octets)")

    # -- TRANSACTION ---------------------------------------------------------------------------
    def _transaction(
        self, event: pop3.Stat | pop3.ListMessages | pop3.Uidl | pop3.Dele | pop3.Rset
    ) -> None:
        drop, core = self.drop, self.core
        assert drop is not None
        match event:
            case pop3.Stat():
                count, octets = drop.stat()
                core.ok(f"{count} {octets}")
            case pop3.Rset():
                drop.reset()
                count, octets = drop.stat()
                core.ok(f"Maildrop has {count} messages ({octets} octets)")
            case pop3.Dele(number):
                problem = drop.delete(number)
                core.ok(f"Message {number} deleted") if problem is None else core.err(problem.value)
            case pop3.ListMessages(None):
                count, octets = drop.stat()
                core.listing(f"{count} messages ({octets} octets)",
                             (f"{n} {m.size}" for n, m in drop.live()))
            case pop3.Uidl(None):
                core.listing("", (f"{n} {m.uid}" for n, m in drop.live()))
            case pop3.ListMessages(number) | pop3.Uidl(number):
                assert number is not None
                found = drop.get(number)
                if isinstance(found, md.Problem):
                    core.err(found.value)
                else:
                    detail = found.size if isinstance(event, pop3.ListMessages) else found.uid
                    core.ok(f"{number} {detail}")
            case _:
                assert_never(event)

    async def _send_message(self, event: pop3.Retr | pop3.Top) -> None:
        assert self.drop is not None
        found = self.drop.get(event.number)
        if isinstance(found, md.Problem):
            self.core.err(found.value)
            return
        f = await asyncio.to_thread(md.open_message, self.drop.path, found)
        if f is None:
            self.core.err("Message is gone from the mailbox", pop3.RespCode.SYS_TEMP)
            return
        with f:
            encoder = self.core.message_begin(f"{found.size} octets")
            while not encoder.done and (chunk := f.read(md.READ_CHUNK)):
                # A local page-cache read of 64 KiB takes microseconds: not worth a thread hop.
                self.core.message_data(encoder, chunk)
                self.stream.write(self.core.data_to_send())
                await self.stream.drain(self.settings.idle_timeout)
            self.core.message_end(encoder)
        if isinstance(event, pop3.Retr):
            self.drop.mark_seen(event.number)
            self.counters.retr += 1
            self.counters.retr_octets += found.size
        else:
            self.counters.top += 1
            self.counters.top_octets += found.size

    # -- UPDATE --------------------------------------------------------------------------------
    async def _quit(self) -> None:
        assert self.drop is not None
        self.committed = await asyncio.to_thread(md.commit, self.drop)
        self.reason = "QUIT"
        if self.committed.errors:
            log.error("update errors: user=<%s>, %s, session=%s",
                      self.user, "; ".join(self.committed.errors), self.id)
            self.core.err("Some deleted messages were not removed", pop3.RespCode.SYS_TEMP)
        else:
            self.core.ok("Logging out")

    def _log_end(self) -> None:
        if self.user is None:
            log.info("disconnected before login (%s): rip=%s, session=%s",
                     self.reason, self.rip, self.id)
        else:
            log.info("logout: user=<%s>, reason=%s, %s, session=%s", self.user, self.reason,
                     self.counters.summary(self.drop, self.committed), self.id)


def _maildir(mail_root: Path, name: str) -> Path:
    """The Maildir of a user: `<root>/<domain>/<user>`; a bare name only exists without local
    domains (a bare users file used on its own), at `<root>/<user>`."""
    if "@" in name:
        return layout.mailbox_path(mail_root, name)
    if layout.canonical_name(name) != name:
        raise ValueError(f"not a valid mailbox name: {name[:80]!r}")
    return mail_root / name


def _lock_maildir(path: Path, owner: MailOwner | None) -> md.MaildropLock | None:
    """A first login before any delivery makes the Maildir, as delivery would (owner, modes,
    durable), so Dovecot can open it too."""
    ensure_maildir(path, owner)
    return md.MaildropLock.acquire(path, owner)


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def _printable(text: str) -> str:
    """A peer-supplied string made safe for one log line."""
    return "".join(c if c.isprintable() and c not in "<>" else "?" for c in text)[:64]
