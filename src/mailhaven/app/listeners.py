"""The listening sockets and what each listener offers (its `ListenerProfile`).

Sockets are bound (or taken over from systemd's socket activation) before the privilege drop,
so ports below 1024 work without running as root; `listen(2)` comes only when serving starts.
Profiles say per listener which SMTP settings, policy, TLS and authentication apply: the MX
port (STARTTLS with whatever certificate we have, ETRN when part-time hosts are configured)
and submission (RFC 6409: AUTH only under TLS before MAIL, sender-login check).
`start_listeners` starts serving on the bound sockets (SMTP, submission, LMTP, POP3), and
`reconfigure_pop3` gives the POP3 listeners a reload's users, timeouts and limits.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path

from mailhaven.app.live import Live
from mailhaven.app.settings import mail_owner, server_settings
from mailhaven.checks.auth_failures import AuthLimiter
from mailhaven.checks.mailbox_full import MailboxFull
from mailhaven.checks.milter.settings import milter_settings
from mailhaven.checks.services import CheckServices
from mailhaven.config import Config, parse_hostport
from mailhaven.delivery.local import LocalAgent
from mailhaven.mailbox.users import UserDB
from mailhaven.net import acme, selfsigned
from mailhaven.net.tls import ReloadableTLS
from mailhaven.pop3d.login_delay import LoginTimes
from mailhaven.pop3d.server import ClientLimits, Pop3Listener, start_pop3_server
from mailhaven.proto.replies import Reply
from mailhaven.smtpd.auth import SMTPAuthenticator
from mailhaven.smtpd.inbound_gate import InboundGate
from mailhaven.smtpd.lmtp_store import LmtpStore, lmtp_policy
from mailhaven.smtpd.policy import PolicySettings, SessionFacts, SMTPPolicy
from mailhaven.smtpd.profile import ListenerProfile
from mailhaven.smtpd.server import SMTPService

log = logging.getLogger("mailhaven.master")

#: The listeners, as named in `[listen]` and by systemd's `FileDescriptorName=`.
LISTENER_NAMES = ("smtp", "submission", "submissions", "pop3", "pop3s", "lmtp")

Bound = dict[str, list[tuple[str, socket.socket]]]


def tls_files(config: Config) -> tuple[Path, Path] | None:
    """The configured certificate; without one, a self-signed one under the state directory
    (made at first start, logged) when any listener serves; None when none does. The MX port
    offers STARTTLS with it too, like Debian's Postfix with its snakeoil certificate: senders
    on port 25 do not check certificates, and opportunistic TLS beats cleartext."""
    if config.tls.cert:
        return Path(config.tls.cert), Path(config.tls.key)
    if config.tls.acme.domains:
        paths = acme.Paths(config.state_path / "acme")
        acme.placeholder(paths, config.hostname, selfsigned.create)
        return paths.cert, paths.key
    listen = config.listen
    if not (listen.smtp or listen.submission or listen.submissions or listen.pop3 or listen.pop3s):
        return None
    cert, key = (
        config.state_path / "tls" / "selfsigned.crt",
        config.state_path / "tls" / "selfsigned.key",
    )
    if not (cert.exists() and key.exists()):
        selfsigned.create(cert, key, config.hostname)
        log.warning("no TLS certificate configured: created a self-signed one in %s", cert.parent)
    elif (old_name := selfsigned.made_for(cert)) != config.hostname:
        selfsigned.create(cert, key, config.hostname)  # `hostname` changed: follow it
        log.warning("self-signed certificate %s was for %s: made again for %s",
                    cert, old_name, config.hostname)
    return cert, key


def load_tls(config: Config) -> ReloadableTLS | None:
    files = tls_files(config)
    return ReloadableTLS(*files) if files is not None else None


#: How long a start waits for an address still held by a stopping instance: after a kill -9
#: of the daemon its worker processes let go of the shared sockets within about a second.
BIND_WAIT = 5.0
BIND_RETRY = 0.1


def bind_address(address: str, wait: float = BIND_WAIT) -> list[socket.socket]:
    """Sockets bound to one `host:port` (as `loop.create_server` would bind them), made before
    the privilege drop so that ports below 1024 work; OSError names the address. An address in
    use is tried again for up to `wait` seconds (logged once) before giving up."""
    deadline = time.monotonic() + wait
    logged = False
    while True:
        try:
            return _bind_once(address)
        except OSError as err:
            if err.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                raise
            if not logged:
                log.warning("%s; waiting up to %g s for it to be free", err.strerror, wait)
                logged = True
            time.sleep(BIND_RETRY)


def _bind_once(address: str) -> list[socket.socket]:
    host, port = parse_hostport(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    out: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(
            host or None, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
        for fam, kind, proto, _, sockaddr in infos:
            sock = socket.socket(fam, kind, proto)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)  # listen(2) comes when serving starts: no early connections
    except OSError as err:
        for sock in out:
            sock.close()
        raise OSError(err.errno, f"cannot listen on {address}: {err.strerror or err}") from None
    return out


def bind_listeners(config: Config, inherited: Sequence[tuple[str, socket.socket]]) -> Bound:
    """Every listening socket, per listener name: the `inherited` ones (systemd's socket
    activation) replace the `[listen]` addresses of their name (unnamed ones are `smtp`);
    the rest we bind."""
    bound: Bound = {}
    for name, sock in inherited:
        name = name or "smtp"
        if name not in LISTENER_NAMES:
            log.warning("ignoring a socket from systemd named %r: not one of %s",
                        name, ", ".join(LISTENER_NAMES))
            sock.close()
            continue
        address = sock.getsockname()
        label = f"{address[0]}:{address[1]} (from systemd)" if isinstance(
            address, tuple) else f"{address!r} (from systemd)"
        bound.setdefault(name, []).append((label, sock))
    try:
        for name in LISTENER_NAMES:
            if name in bound:
                continue
            for address in getattr(config.listen, name):
                bound.setdefault(name, []).extend(
                    (address, sock) for sock in bind_address(address)
                )
    except OSError:
        for socks in bound.values():
            for _, sock in socks:
                sock.close()
        raise
    return bound


class Profiles:
    """The SMTP listeners' profiles, built from the live configuration. The MX profile is
    built once per configuration (`forget` on reload), not per connection: per-connection
    building showed in the relay profile."""

    def __init__(
        self,
        live: Live,
        tls: Callable[[], ReloadableTLS | None],
        authenticator: SMTPAuthenticator,
        *,
        checks: CheckServices | None = None,
    ) -> None:
        self.live = live
        self.checks = checks
        self._tls = tls
        self.authenticator = authenticator
        self._mx: ListenerProfile | None = None
        self._lmtp: ListenerProfile | None = None
        #: the MX port's mail authentication (set once the engine exists: `app.mail_auth`)
        self.inbound: Callable[[], InboundGate | None] = lambda: None
        #: the MX port's ETRN (set once the engine exists; without it ETRN is not offered)
        self.etrn: Callable[[SessionFacts, str], Awaitable[Reply]] | None = None

    def forget(self) -> None:
        self._mx = None
        self._lmtp = None

    def tls_context(self) -> ssl.SSLContext | None:
        tls = self._tls()
        return tls.context if tls is not None else None

    def mx(self) -> ListenerProfile:
        if self._mx is None:
            config = self.live.config
            settings = server_settings(config, starttls=self._tls() is not None)
            self._mx = ListenerProfile(
                name="smtp",
                settings=replace(settings, etrn=bool(config.etrn.held_domains)),
                policy=SMTPPolicy(
                    lambda: self.live.router, PolicySettings(), mailbox_full=self._mailbox_full()
                ),
                tls_context=self.tls_context,
                etrn=self.etrn,
                gate=self.checks.gate(screen=True) if self.checks else None,
                milters=milter_settings(config, "smtp"),
                inbound=self.inbound(),
            )
        return self._mx

    def _mailbox_full(self) -> MailboxFull | None:
        """`[quota] check_at_rcpt`: the MX refuses RCPT for a mailbox known to be full."""
        config = self.live.config
        if not config.quota.check_at_rcpt:
            return None
        return MailboxFull(lambda: self.live.router, self.live.quotas, config.mail_root)

    def lmtp(self) -> ListenerProfile:
        """`[listen] lmtp`: RFC 2033 into the local Maildirs, no TLS, no AUTH (`smtpd.lmtp_store`)."""
        if self._lmtp is None:
            config, live = self.live.config, self.live
            agent = LocalAgent(
                config.mail_root, config.hostname, users=live.mailboxes,
                quotas=live.quotas, folder_rules=live.folders, owner=mail_owner(config),
            )
            store = LmtpStore(
                lambda: live.router, agent, hostname=config.hostname,
                spool_dir=config.state_path / "lmtp", mailboxes=live.mailboxes,
            )
            self._lmtp = ListenerProfile(
                name="lmtp",
                settings=replace(server_settings(config), lmtp=True),
                policy=lmtp_policy(lambda: live.router, mailbox_full=self._mailbox_full()),
                tls_context=lambda: None,
                store=store,
            )
        return self._lmtp

    def submission(self, *, implicit_tls: bool) -> ListenerProfile:
        """RFC 6409 submission: AUTH (only under TLS) before MAIL, sender-login check."""
        starttls = self._tls() is not None and not implicit_tls
        settings = replace(
            server_settings(self.live.config, starttls=starttls),
            tls_on_connect=implicit_tls,
            auth_mechanisms=self.authenticator.mechanisms,
            auth_requires_tls=True,
        )
        return ListenerProfile(
            name="submissions" if implicit_tls else "submission",
            settings=settings,
            policy=SMTPPolicy(
                lambda: self.live.router,
                PolicySettings(require_auth=True, sender_login_check=True),
            ),
            tls_context=self.tls_context,
            authenticator=self.authenticator,
            gate=self.checks.gate(screen=False) if self.checks else None,
            milters=milter_settings(self.live.config, "submission"),
        )


async def start_listeners(
    bound: Bound,
    smtp: SMTPService,
    profiles: Profiles,
    live: Live,
    *,
    has_tls: bool,
    limiter: AuthLimiter,
    pop3_clients: ClientLimits,
    pop3_logins: LoginTimes,
) -> tuple[list[socket.socket], list[Pop3Listener]]:
    """Serve on every bound socket: (the `smtp` listening sockets, which worker processes
    share, and the POP3 listeners). Without a certificate the implicit-TLS listeners
    (submissions, pop3s) stay off, with a warning."""
    config = live.config
    smtp_sockets: list[socket.socket] = []
    for address, sock in bound.get("smtp", []):
        server = await smtp.listen(address, profiles.mx, sock=sock)
        smtp_sockets.extend(server.sockets)
        log.info("smtp listening on %s", address)
    for address, sock in bound.get("submission", []):
        await smtp.listen(address, lambda: profiles.submission(implicit_tls=False), sock=sock)
        log.info("submission listening on %s", address)
    for address, sock in bound.get("lmtp", []):
        await smtp.listen(address, profiles.lmtp, sock=sock)
        log.info("lmtp listening on %s", address)
    tls_listeners = [*bound.get("submissions", []), *bound.get("pop3s", [])]
    if not has_tls and tls_listeners:
        log.warning("no TLS certificate: submissions and pop3s listeners are off")
        for _, sock in tls_listeners:
            sock.close()
    if has_tls:
        for address, sock in bound.get("submissions", []):
            await smtp.listen(
                address, lambda: profiles.submission(implicit_tls=True),
                implicit_tls=True, sock=sock,
            )
            log.info("submissions (implicit TLS) listening on %s", address)
    pop3 = [(a, s, False) for a, s in bound.get("pop3", [])]
    if has_tls:
        pop3 += [(a, s, True) for a, s in bound.get("pop3s", [])]
    listeners: list[Pop3Listener] = []
    for address, sock, implicit in pop3:
        listener = await start_pop3_server(
            None,
            0,
            sock=sock,
            mail_root=config.mail_root,
            users=live.users,
            tls_context=profiles.tls_context(),
            implicit_tls=implicit,
            allow_plaintext_on_loopback=True,
            hostname=config.hostname,
            idle_timeout=config.timeouts.pop3_idle,
            tls_handshake_timeout=config.timeouts.tls_handshake,
            limiter=limiter,
            clients=pop3_clients,
            login_delay=config.mailbox.pop3_login_delay,
            expire=config.mailbox.pop3_expire,
            owner=mail_owner(config),
            logins=pop3_logins,
        )
        listeners.append(listener)
        log.info("pop3%s listening on %s", "s" if implicit else "", address)
    return smtp_sockets, listeners


def reconfigure_pop3(listeners: Sequence[Pop3Listener], config: Config, users: UserDB) -> None:
    """A reload: POP3 logins check the new users file, with the new timeouts (the per-client
    limits are the shared `ClientLimits`, changed by whoever owns it)."""
    for listener in listeners:
        listener.services.users = users
        listener.services.settings = replace(
            listener.services.settings,
            idle_timeout=config.timeouts.pop3_idle,
            tls_handshake_timeout=config.timeouts.tls_handshake,
        )
