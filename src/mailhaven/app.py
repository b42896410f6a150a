"""The composition root: builds every role from the configuration and runs them in one process.

receive (smtpd) -> intake -> spool -> scheduler -> delivery agents (local Maildir, relay)
-> bounce. Each role gets only the narrow callables it needs; nothing else here has logic.
With `smtp_processes` > 1 the same engine (`_build_engine`) also runs in each worker process on
its own queue shard (`mailhaven.runtime.workers`, `spool.shards`); `App(config, worker=role)` is one.

Local submission: `mailhaven sendmail` writes into `<state_dir>/maildrop/`; the pickup collects it
at start-up, when poked over the control socket (`<state_dir>/control.sock`, also used by
`mailhaven queue` and `sendmail -q`) and when the directory changes. The daemon holds the queue
lock (`DaemonLock`) for its lifetime, so an offline CLI never opens the spool behind it.

Signals: SIGTERM/SIGINT stop gracefully (see `SMTPService.shutdown`); SIGHUP re-reads the
config file and applies every setting except `RESTART_ONLY` ones (domains, users, aliases,
trusted networks, ETRN's held domains and clients, limits and timeouts for new sessions, the
TLS certificate, relay and queue settings, the log level). Reload validates everything first
(the file, the users file, the certificate) and then applies all of it or, when anything is
wrong, none of it; the log says which and why. The daemon forwards SIGHUP to its workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sqlite3
import ssl
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

from mailhaven import __version__, maillog
from mailhaven import config as configuration
from mailhaven.bounce.notifier import NoticeLimiter, Notifier
from mailhaven.checks.auth_failures import AuthLimiter
from mailhaven.config import Config, parse_hostport
from mailhaven.control import channel as control
from mailhaven.control.forwarding import Forwarding
from mailhaven.control.queue_admin import QueueAdmin
from mailhaven.delivery.base import DeliveryAgent
from mailhaven.delivery.local import LocalAgent
from mailhaven.delivery.relay import RelayAgent, RelaySettings, Smarthost, TLSPolicy
from mailhaven.faults import arm as arm_crash_points
from mailhaven.faults import crash_point
from mailhaven.intake.cleanup import Intake
from mailhaven.mailbox.users import UserDB, UsersFileError
from mailhaven.net import acme, selfsigned
from mailhaven.net.client_names import ClientNames
from mailhaven.net.dns import Resolver
from mailhaven.net.tls import ReloadableTLS, build_server_context, certificate_facts
from mailhaven.pickup.collector import IntakeDoor, Pickup
from mailhaven.pop3d.server import ClientLimits, Pop3Listener, start_pop3_server
from mailhaven.proto.envelope import Envelope
from mailhaven.proto.replies import Reply
from mailhaven.proto.smtp_client import Credentials
from mailhaven.proto.smtp_server import ServerSettings
from mailhaven.routing.held import PartTimeHosts
from mailhaven.routing.route import Route
from mailhaven.routing.router import Router
from mailhaven.runtime import logtargets, privileges, systemd
from mailhaven.runtime.workers import WorkerPool, WorkerRole, control_socket, watch_lifeline
from mailhaven.scheduler.backoff import BackoffPolicy
from mailhaven.scheduler.plan import Limits as PlanLimits
from mailhaven.scheduler.runner import Runner
from mailhaven.smtpd.auth import SMTPAuthenticator
from mailhaven.smtpd.policy import PolicySettings, SessionFacts, SMTPPolicy
from mailhaven.smtpd.server import SMTPService
from mailhaven.smtpd.session import ListenerProfile, Writer
from mailhaven.spool import shards
from mailhaven.spool.body import MessageWriter
from mailhaven.spool.lock import DaemonLock, lock_path
from mailhaven.spool.store import Spool

log = logging.getLogger("mailhaven.master")

#: Settings a reload keeps (logged when the file changes them): the listening sockets, the
#: processes, the loop and the queue's place are made once; the host name is baked into the
#: engine (Received: fields, bounces, Maildir names, HELO), so it changes all at once or not.
RESTART_ONLY = (
    "listen", "state_dir", "smtp_processes", "event_loop", "hostname", "user", "group"
)

#: The listeners, as named in `[listen]` and by systemd's `FileDescriptorName=`.
LISTENER_NAMES = ("smtp", "submission", "submissions", "pop3", "pop3s")

#: How often the daemon tells systemd its queue size (`systemctl status`).
STATUS_INTERVAL = 30.0


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


def bind_address(address: str) -> list[socket.socket]:
    """Sockets bound to one `host:port` (as `loop.create_server` would bind them), made before
    the privilege drop so that ports below 1024 work; OSError names the address."""
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


def load_tls(config: Config) -> ReloadableTLS | None:
    files = tls_files(config)
    return ReloadableTLS(*files) if files is not None else None


def backoff_policy(config: Config) -> BackoffPolicy:
    q = config.queue
    return BackoffPolicy(
        minimal=q.minimal_backoff,
        maximal=q.maximal_backoff,
        lifetime=q.lifetime,
        delay_warning=q.delay_warning or None,
    )


def plan_limits(config: Config) -> PlanLimits:
    """The processes share the configured limits: a remote host sees at most
    `destination_concurrency` connections from all of us together (rounded up)."""
    q = config.queue
    processes = max(1, config.smtp_processes)
    return PlanLimits(
        max_deliveries=-(-q.concurrency // processes),
        per_destination=-(-q.destination_concurrency // processes),
        per_delivery=q.recipients_per_transaction,
        dead_time=q.minimal_backoff,
    )


def mailbox_names(config: Config, users: UserDB) -> Callable[[], Collection[str]]:
    """Current mailbox names: `local_users` plus the users file (reloaded when it changes)."""
    fixed = {u.lower() for u in config.local_users}

    def names() -> Collection[str]:
        return fixed | users.names()

    return names


def build_router(config: Config, users: UserDB) -> Router:
    mailboxes = mailbox_names(config, users)
    aliases: dict[str, Sequence[str]] = dict(config.aliases)
    return Router(
        local_domains=config.local_domains,
        mailboxes=mailboxes,
        aliases=aliases,
        catch_all=config.catch_all or None,
        recipient_delimiter=config.recipient_delimiter,
        trusted_networks=config.trusted_networks,
        relay_domains=config.relay_domains,
        relayhost=config.relayhost or None,
        held_domains=config.etrn.held_domains,
        transport_map=config.relay.transport,
    )


def build_relay_agent(config: Config) -> RelayAgent:
    relay = config.relay
    nameservers = [parse_hostport(n) for n in relay.nameservers] or None
    smarthosts = []
    if config.relayhost:
        credentials = (
            Credentials(relay.relayhost_username, relay.relayhost_password)
            if relay.relayhost_username
            else None
        )
        smarthosts.append(
            Smarthost(config.relayhost, credentials, cast(TLSPolicy, relay.relayhost_tls))
        )
    return RelayAgent(
        Resolver(nameservers),
        RelaySettings(
            helo_name=config.hostname,
            port=relay.port,
            tls_policy=cast(TLSPolicy, relay.tls),
            max_hosts=relay.max_hosts,
            self_names=(config.hostname,),
        ),
        smarthosts=smarthosts,
    )


@dataclass(frozen=True)
class PreparedReload:
    """What a reload swaps in, all of it read and checked before anything is applied."""

    config: Config
    users: UserDB
    router: Router
    relay_agent: RelayAgent  # its settings, for the running agent
    #: `RESTART_ONLY` settings the file changed (kept as they are until a restart)
    kept: tuple[str, ...] = ()
    #: a renewed certificate for the running `ReloadableTLS`, and the files it came from
    tls_backend: ssl.SSLContext | None = None
    tls_files: tuple[Path, Path] | None = None
    #: the first certificate (none was needed before)
    new_tls: ReloadableTLS | None = None


class SpoolSink:
    """Adapts spool + intake to what an SMTP session needs (`smtpd.session.MessageSink`)."""

    def __init__(self, spool: Spool, intake: Intake) -> None:
        self.spool = spool
        self.intake = intake

    def new_message(self) -> Writer:
        return self.spool.new_message()

    async def accept(self, writer: Writer, envelope: Envelope, tls: str | None) -> Reply:
        assert isinstance(writer, MessageWriter)
        outcome = await self.intake.submit(writer, envelope, tls=tls)
        return outcome.reply


def server_settings(config: Config, *, starttls: bool = False) -> ServerSettings:
    limits = config.limits
    return ServerSettings(
        hostname=config.hostname,
        max_message_size=limits.message_size,
        max_recipients=limits.recipients,
        command_line_limit=limits.command_line,
        hard_error_limit=limits.hard_error_limit,
        forbid_unauth_pipelining=limits.forbid_unauth_pipelining,
        max_commands=limits.commands_per_session,
        starttls=starttls,
    )


class App:
    """One running mailhaven: call `await App(config).run()`; `stop()` from elsewhere."""

    def __init__(self, config: Config, *, worker: WorkerRole | None = None) -> None:
        self.config = config
        #: set in a worker process (see `mailhaven.runtime.workers`): the engine on a shard of its own
        self.worker = worker
        self.workers: WorkerPool | None = None
        self.relay_agent: RelayAgent | None = None
        self.users = UserDB(config.users_path)
        self.router = build_router(config, self.users)
        self.tls: ReloadableTLS | None = None
        self._mx: ListenerProfile | None = None
        self.auth_limiter = AuthLimiter(
            max_failures=config.limits.auth_failures,
            max_address_failures=config.limits.auth_address_failures,
            failure_delay=config.limits.auth_failure_delay,
        )
        self.pop3: list[Pop3Listener] = []
        #: per-address connection counts and rates over every POP3 listener (`[limits]`)
        self.pop3_clients = ClientLimits(
            config.limits.connections_per_ip, config.limits.connection_rate
        )
        self.part_time: PartTimeHosts | None = None
        self._background: list[asyncio.Future[None]] = []
        self._release_task: asyncio.Future[None] | None = None
        self._route: Callable[[str], Route] = lambda address: self.router.route(address)
        self.spool = Spool(
            shards.shard_path(config.spool_path, worker.shard if worker else 0),
            checkpoint=crash_point,
            minfree=config.queue.minfree,
        )
        self._stop = asyncio.Event()
        self.smtp: SMTPService | None = None
        self.runner: Runner | None = None
        self.pickup: Pickup | None = None
        self.control: control.ControlServer | None = None
        self._queue_lock: DaemonLock | None = None
        self.ready = asyncio.Event()
        #: systemd's notify socket, when it started us (`Type=notify`)
        self.manager: systemd.Notifier | None = None
        self._started = time.monotonic()
        self._smtp_sockets: list[socket.socket] = []
        #: the listening sockets per listener name, bound (or inherited) before the drop
        self._bound: dict[str, list[tuple[str, socket.socket]]] = {}

    # ------------------------------------------------------------------ wiring

    def _client_names(self, config: Config) -> ClientNames | None:
        """Client name lookups through the relay's resolver (`[relay] nameservers`)."""
        if not config.reverse_lookup or self.relay_agent is None:
            return None
        return ClientNames(self.relay_agent.resolver, config.timeouts.client_lookup)

    def _tls_context(self) -> ssl.SSLContext | None:
        return self.tls.context if self.tls is not None else None

    def _mx_profile(self) -> ListenerProfile:
        """The MX listener's profile: built once per configuration (`reload` forgets it), not
        per connection, which showed in the relay profile (settings, policy, a replace())."""
        if self._mx is None:
            self._mx = self._build_mx_profile()
        return self._mx

    def _build_mx_profile(self) -> ListenerProfile:
        settings = server_settings(self.config, starttls=self.tls is not None)
        return ListenerProfile(
            name="smtp",
            settings=replace(settings, etrn=bool(self.config.etrn.held_domains)),
            policy=SMTPPolicy(lambda: self.router, PolicySettings()),
            tls_context=self._tls_context,
            etrn=self._etrn,
        )

    async def _etrn(self, facts: SessionFacts, argument: str) -> Reply:
        if self.worker is not None:  # the daemon opens the release windows in every shard
            return await self._forward_etrn(facts.client_ip, argument)
        assert self.part_time is not None
        return await self.part_time.etrn(facts.client_ip, argument)

    async def _forward_etrn(self, client_ip: str, argument: str) -> Reply:
        path = self.config.state_path / control.SOCKET_NAME
        request = {"cmd": "etrn", "client": client_ip, "node": argument}
        try:
            answer = await asyncio.to_thread(control.request, path, request, 10.0)
        except control.ControlError as err:
            answer = {"ok": False, "error": str(err)}
        if answer and answer.get("ok") and isinstance(answer.get("reply"), list):
            code, enhanced, text = answer["reply"]
            return Reply(int(code), str(text), enhanced)
        log.error("ETRN %s: the daemon did not answer: %s", argument, answer)
        return Reply(458, f"Unable to queue messages for node {argument}", "4.3.0")

    def _release_route(self, domain: str) -> Route:
        """Where a released part-time domain's mail goes: its transport entry, else its MX."""
        config = self.config
        return Route("relay", config.relay.transport.get(domain) or config.relayhost or domain)

    def _schedule_releases(self) -> None:
        """(Re)start the periodic release of held domains (the daemon releases every shard)."""
        if self._release_task is not None:
            self._release_task.cancel()
            self._release_task = None
        interval = self.config.etrn.release_interval
        if interval > 0 and self.worker is None:
            self._release_task = asyncio.ensure_future(self._release_schedule(interval))

    async def _release_schedule(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            assert self.part_time is not None
            count = await self.part_time.release_all()
            log.info("scheduled release of part-time domains: %d message(s)", count)

    def _submission_profile(self, *, implicit_tls: bool) -> ListenerProfile:
        """RFC 6409 submission: AUTH (only under TLS) before MAIL, sender-login check."""
        settings = replace(
            server_settings(self.config, starttls=self.tls is not None and not implicit_tls),
            tls_on_connect=implicit_tls,
            auth_mechanisms=self.authenticator.mechanisms,
            auth_requires_tls=True,
        )
        return ListenerProfile(
            name="submissions" if implicit_tls else "submission",
            settings=settings,
            policy=SMTPPolicy(
                lambda: self.router,
                PolicySettings(require_auth=True, sender_login_check=True),
            ),
            tls_context=self._tls_context,
            authenticator=self.authenticator,
        )

    async def _start_listeners(self) -> None:
        config = self.config
        assert self.smtp is not None
        bound = self._bound
        for address, sock in bound.get("smtp", []):
            server = await self.smtp.listen(address, self._mx_profile, sock=sock)
            self._smtp_sockets.extend(server.sockets)
            log.info("smtp listening on %s", address)
        for address, sock in bound.get("submission", []):
            await self.smtp.listen(
                address, lambda: self._submission_profile(implicit_tls=False), sock=sock
            )
            log.info("submission listening on %s", address)
        tls_listeners = [*bound.get("submissions", []), *bound.get("pop3s", [])]
        if self.tls is None and tls_listeners:
            log.warning("no TLS certificate: submissions and pop3s listeners are off")
            for _, sock in tls_listeners:
                sock.close()
        if self.tls is not None:
            for address, sock in bound.get("submissions", []):
                await self.smtp.listen(
                    address, lambda: self._submission_profile(implicit_tls=True),
                    implicit_tls=True, sock=sock,
                )
                log.info("submissions (implicit TLS) listening on %s", address)
        pop3 = [(a, s, False) for a, s in bound.get("pop3", [])]
        if self.tls is not None:
            pop3 += [(a, s, True) for a, s in bound.get("pop3s", [])]
        for address, sock, implicit in pop3:
            listener = await start_pop3_server(
                None,
                0,
                sock=sock,
                mail_root=config.mail_root,
                users=self.users,
                tls_context=self._tls_context(),
                implicit_tls=implicit,
                allow_plaintext_on_loopback=True,
                hostname=config.hostname,
                idle_timeout=config.timeouts.pop3_idle,
                tls_handshake_timeout=config.timeouts.tls_handshake,
                limiter=self.auth_limiter,
                clients=self.pop3_clients,
            )
            self.pop3.append(listener)
            log.info("pop3%s listening on %s", "s" if implicit else "", address)

    async def start(self) -> None:
        if self.worker is not None:
            await self._start_as_worker(self.worker)
            return
        config = self.config
        log.info(
            "starting mailhaven: hostname=%s state_dir=%s config=%s event_loop=%s",
            config.hostname,
            config.state_path,
            config.source or "(built-in defaults)",
            # the loop that really runs (its package: "asyncio" or "uvloop"), not the setting
            type(asyncio.get_running_loop()).__module__.partition(".")[0],
        )
        self._bound = self._bind_listeners(systemd.listen_sockets())
        self._drop_privileges()
        # private: queued mail and mailboxes (spool/ itself is made 0700 by the spool)
        config.state_path.mkdir(mode=0o750, parents=True, exist_ok=True)
        config.mail_root.mkdir(mode=0o700, exist_ok=True)
        self.users.load()
        self.tls = load_tls(config)
        self.authenticator = SMTPAuthenticator(self.users, self.auth_limiter)
        self._queue_lock = self._lock_queue()
        await asyncio.to_thread(self._adopt_orphans)
        await asyncio.to_thread(self.spool.open)
        intake = self._build_engine()
        self.smtp = SMTPService(
            sink=SpoolSink(self.spool, intake), limits=config.limits, timeouts=config.timeouts,
            storage=self.spool.storage_refusal, client_names=self._client_names(config),
        )
        # The control socket is up before any listener: once a client can connect, a
        # `sendmail` poke is answered too (else its mail waits for the pickup's next poll).
        await self._start_local_submission(intake)
        await self._start_listeners()
        self._start_runner()
        await self._start_workers()
        self._start_acme()
        self.ready.set()
        arm_crash_points()  # tests only: start-up's own commits are not crash points

    def _bind_listeners(
        self, inherited: Sequence[tuple[str, socket.socket]]
    ) -> dict[str, list[tuple[str, socket.socket]]]:
        """Every listening socket, per listener name: the `inherited` ones (systemd's socket
        activation) replace the `[listen]` addresses of their name (unnamed ones are `smtp`);
        the rest we bind."""
        bound: dict[str, list[tuple[str, socket.socket]]] = {}
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
                for address in getattr(self.config.listen, name):
                    bound.setdefault(name, []).extend(
                        (address, sock) for sock in bind_address(address)
                    )
        except OSError:
            for socks in bound.values():
                for _, sock in socks:
                    sock.close()
            raise
        return bound

    def _drop_privileges(self) -> None:
        """Started as root with `user` set: hand the state directory over and become the user,
        before anything reads network input or writes state (runtime.privileges)."""
        config = self.config
        if os.geteuid() != 0:
            return
        if not config.user:
            log.warning("running as root: set `user` to run as an unprivileged account")
            return
        try:
            who = privileges.resolve(config.user, config.group)
        except LookupError as err:
            raise OSError(str(err)) from None
        privileges.hand_over(config.state_path, who)
        kind, where = logtargets.parse(config.log)
        if kind == "file":  # opened already; the user reopens it on SIGUSR1 (logrotate)
            with contextlib.suppress(OSError):
                os.chown(where, who.uid, who.gid)
        privileges.drop(who)

    def _lock_queue(self) -> DaemonLock:
        lock = DaemonLock.acquire(lock_path(self.spool.root))
        if lock is None:
            raise OSError(f"{self.spool.root}: the queue is in use (another mailhaven?)")
        return lock

    def _adopt_orphans(self) -> None:
        """Shards that no process serves any more (`smtp_processes` was lowered) move into
        ours before our recovery runs; one that is locked (a worker of an old daemon still
        stopping) waits for our next start."""
        for orphan in shards.orphans(self.config.spool_path, self.config.smtp_processes):
            lock = DaemonLock.acquire(lock_path(orphan))
            if lock is None:
                log.error("spool %s is in use; not adopting it now", orphan)
                continue
            with lock:
                try:
                    shards.adopt(self.config.spool_path, orphan)
                except (OSError, RuntimeError, sqlite3.Error) as err:
                    log.error("spool %s: cannot adopt it: %s", orphan, err)

    def _worker_sockets(self) -> list[Path]:
        state = self.config.state_path
        return [control_socket(state, k) for k in range(1, self.config.smtp_processes)]

    def _build_engine(self) -> Intake:
        """Scheduler, delivery agents, bounces and intake on `self.spool` (every process)."""
        config = self.config
        self.relay_agent = build_relay_agent(config)
        agents: dict[str, DeliveryAgent] = {
            "relay": self.relay_agent,
            "local": LocalAgent(
                config.mail_root,
                config.hostname,
                users=lambda: mailbox_names(self.config, self.users)(),
            ),
        }
        notifier = Notifier(
            self.spool,
            lambda: intake,
            hostname=config.hostname,
            postmaster=f"postmaster@{config.local_domains[0]}",
            # each process keeps its own count: its share of the limit (rounded up)
            limiter=NoticeLimiter(
                -(-config.queue.notice_rate_limit // max(1, config.smtp_processes)),
                config.queue.notice_rate_window,
            ),
        )
        processes = max(1, config.smtp_processes)
        self.runner = Runner(
            self.spool,
            agents,
            lambda address: self._route(address),  # late-bound: part-time hosts wrap it below
            on_failures=notifier.on_failures,
            on_delay=notifier.on_delay,
            policy=backoff_policy(config),
            limits=plan_limits(config),
        )
        daemon_with_workers = self.worker is None and processes > 1
        self.part_time = PartTimeHosts(
            held_domains=config.etrn.held_domains,
            clients=config.etrn.clients,
            release=self.spool.release_domain,
            wake=self.runner.flush,
            elsewhere=self._release_in_workers if daemon_with_workers else None,
        )
        self._route = self.part_time.route(lambda a: self.router.route(a), self._release_route)
        self._schedule_releases()
        intake = Intake(
            self.spool,
            hostname=config.hostname,
            expand=lambda address: self.router.expand(address),
            held=lambda address: self._route(address).transport == "hold",
            wake=self.runner.wake,
            handoff=self.runner,
        )
        return intake

    def _start_acme(self) -> None:
        """`[tls] acme`: the daemon orders and renews; a worker reloads what it installed."""
        settings = self.config.tls.acme
        if not settings.domains or self.tls is None:
            return
        if self.worker is not None:
            task = acme.follow(self.tls, acme.FOLLOW_INTERVAL)
        else:
            paths = acme.Paths(self.config.state_path / "acme")
            task = acme.AcmeManager(settings, paths, self.tls).run()
        self._background.append(asyncio.ensure_future(task))

    async def _release_in_workers(self, domains: Sequence[str]) -> int:
        request = {"cmd": "release_domains", "domains": list(domains)}
        return await control.ask_all(self._worker_sockets(), request)

    def _start_runner(self) -> None:
        assert self.runner is not None
        self._runner_task = asyncio.ensure_future(self.runner.run())

    async def _start_workers(self) -> None:
        """`smtp_processes` > 1: worker processes on our `smtp` listening sockets."""
        extra = self.config.smtp_processes - 1
        if extra <= 0 or self.smtp is None:
            return
        fds = [s.fileno() for s in self._smtp_sockets]
        self.workers = WorkerPool(extra, self.config.source, fds)
        await self.workers.start()

    async def _start_as_worker(self, role: WorkerRole) -> None:
        """A worker process: the whole engine on its own shard, on the daemon's sockets."""
        config = self.config
        self.users.load()
        self.tls = load_tls(config)  # the daemon made any self-signed certificate already
        self.authenticator = SMTPAuthenticator(self.users, self.auth_limiter)  # for `reload`
        self._queue_lock = self._lock_queue()
        await asyncio.to_thread(self.spool.open)
        intake = self._build_engine()
        assert self.runner is not None and self.part_time is not None
        self.smtp = SMTPService(
            sink=SpoolSink(self.spool, intake), limits=config.limits, timeouts=config.timeouts,
            storage=self.spool.storage_refusal, client_names=self._client_names(config),
        )
        self.control = control.ControlServer(
            control_socket(config.state_path, role.shard),
            QueueAdmin(
                self.spool,
                wake=self.runner.revisit,
                release_domains=self.part_time.release,
                forget_dead=self.runner.forget_dead,
            ),
        )
        await self.control.start()
        for fd in role.fds:
            await self.smtp.listen("", self._mx_profile, sock=socket.socket(fileno=fd))
        self._start_runner()
        self._start_acme()
        if role.lifeline is not None:
            watch_lifeline(role.lifeline, self.stop)
        log.info("worker %d ready on %d smtp socket(s), queue %s", role.shard, len(role.fds),
                 self.spool.root)
        self.ready.set()

    async def _start_local_submission(self, intake: Intake) -> None:
        """The pickup (collects what `sendmail` dropped, also while we were down) and the
        control socket that `sendmail` pokes and `mailhaven queue` drives."""
        state = self.config.state_path
        pickup = Pickup(state / "maildrop", IntakeDoor(self.spool, intake))
        await asyncio.to_thread(pickup.prepare)
        self.pickup = pickup

        async def collect_then_watch() -> None:
            await pickup.collect()
            await pickup.run()

        self._background.append(asyncio.ensure_future(collect_then_watch()))
        assert self.runner is not None and self.part_time is not None
        admin = QueueAdmin(
            self.spool,
            wake=self.runner.revisit,
            pickup=pickup.collect,
            etrn=self.part_time.etrn,
            release_domains=self.part_time.release,
            forget_dead=self.runner.forget_dead,
            about=self._about,
        )
        handlers: control.Handlers = admin
        if self.config.smtp_processes > 1:  # queue verbs reach the workers' shards too
            handlers = Forwarding(admin, self._worker_sockets())
        self.control = control.ControlServer(state / control.SOCKET_NAME, handlers)
        await self.control.start()

    # ------------------------------------------------------------------ life cycle

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # Read (and unset) before any worker is spawned: only the daemon talks to systemd.
        self.manager = systemd.Notifier.from_environ() if self.worker is None else None
        await self.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self._reload_signalled)
            loop.add_signal_handler(signal.SIGUSR1, self._reopen_log)
        if self.manager is not None:
            self.manager.send("READY=1", f"STATUS={await self._status()}")
            self._background.append(asyncio.ensure_future(self._report_to_manager()))
        await self._stop.wait()
        if self.manager is not None:
            self.manager.send("STOPPING=1", "STATUS=finishing transactions in flight")
        await self.shutdown()
        return 0

    def _reopen_log(self) -> None:
        """SIGUSR1 (logrotate's postrotate): reopen a log file here and in every worker."""
        if self.workers is not None:
            self.workers.signal(signal.SIGUSR1)
        maillog.reopen()

    def _reload_signalled(self) -> None:
        """SIGHUP, bracketed for systemd (`Type=notify-reload` wants RELOADING=1 with the
        monotonic time, then READY=1 once the new configuration is in force)."""
        if self.manager is not None:
            usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            self.manager.send("RELOADING=1", f"MONOTONIC_USEC={usec}")
        self.reload()
        if self.manager is not None:
            self.manager.send("READY=1")

    def _about(self) -> dict[str, Any]:
        """What `mailhaven status` shows besides the queue: who, since when, where, which
        certificate (and how long it has left)."""
        listen = self.config.listen
        return {
            "pid": os.getpid(),
            "version": __version__,
            "hostname": self.config.hostname,
            "config": self.config.source or "(built-in defaults)",
            "state_dir": str(self.config.state_path),
            "uptime": round(time.monotonic() - self._started, 1),
            "listeners": {
                name: list(getattr(listen, name))
                for name in ("smtp", "submission", "submissions", "pop3", "pop3s")
                if getattr(listen, name)
            },
            "processes": self.config.smtp_processes,
            "certificate": certificate_facts(self.tls.cert_file) if self.tls else None,
        }

    async def _status(self) -> str:
        queued = await self.spool.count()
        return f"serving; {queued} message(s) in the queue"

    async def _report_to_manager(self) -> None:
        """WATCHDOG=1 while the event loop turns (a stuck loop stops the pings and systemd
        restarts us), and a STATUS= line with the queue size for `systemctl status`."""
        assert self.manager is not None
        watchdog = self.manager.watchdog_interval
        interval = min(watchdog, STATUS_INTERVAL) if watchdog else STATUS_INTERVAL
        next_status = asyncio.get_running_loop().time() + STATUS_INTERVAL
        while True:
            await asyncio.sleep(interval)
            fields = ["WATCHDOG=1"] if watchdog else []
            if asyncio.get_running_loop().time() >= next_status:
                next_status += STATUS_INTERVAL
                with contextlib.suppress(Exception):  # a busy spool skips one report
                    fields.append(f"STATUS={await self._status()}")
            if fields:
                self.manager.send(*fields)

    def stop(self) -> None:
        log.info("stopping: finishing transactions in flight")
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: validate the whole new configuration, then apply all of it or none."""
        if self.workers is not None:
            self.workers.signal(signal.SIGHUP)  # each re-reads the same file itself
        path = self.config.source
        try:
            prepared = self._prepare_reload()
        except (configuration.ConfigError, UsersFileError) as err:
            log.error("reload: refused, keeping the old configuration (nothing applied): %s", err)
            return
        self._apply_reload(prepared)
        for name in prepared.kept:
            log.warning("reload: %s changed; it takes effect at the next restart", name)
        log.info("reload: configuration %s applied", path or "(built-in defaults)")
        # last, so that line is logged even when the new level hides it (as maillog.setup)
        logging.getLogger("mailhaven").setLevel(prepared.config.log_level.upper())

    def _prepare_reload(self) -> PreparedReload:
        """Everything a reload needs that can fail, made without touching what runs: the
        configuration, its users file and its certificate (read afresh: a renewal)."""
        new = configuration.load(self.config.source)
        kept = tuple(n for n in RESTART_ONLY if getattr(new, n) != getattr(self.config, n))
        new = replace(new, **{name: getattr(self.config, name) for name in RESTART_ONLY})
        users = UserDB(new.users_path)
        users.load()
        try:
            relay_agent = build_relay_agent(new)
        except OSError as err:  # the system's resolver configuration
            raise configuration.ConfigError(f"relay: {err}") from None
        prepared = PreparedReload(new, users, build_router(new, users), relay_agent, kept)
        try:
            files = tls_files(new) if self.tls is not None or new.tls.cert else None
            if files is None:
                return prepared
            if self.tls is None:  # a certificate where there was none: STARTTLS on the MX
                return replace(prepared, new_tls=ReloadableTLS(*files))
            return replace(prepared, tls_backend=build_server_context(*files), tls_files=files)
        except (OSError, ssl.SSLError) as err:
            where = new.tls.cert or new.state_path / "tls"  # the configured or self-signed
            raise configuration.ConfigError(f"TLS certificate {where}: {err}") from None

    def _apply_reload(self, prepared: PreparedReload) -> None:
        """Swap in a prepared configuration; nothing here can fail half-way."""
        old, new = self.config, prepared.config
        self.config = new
        self._mx = None  # the next connection builds the profile from the new configuration
        users = self.users = prepared.users
        # AUTH must check the same (possibly newly named) users file that the router now
        # delivers to; the old UserDB would keep accepting logins of users no longer in it.
        self.authenticator.users = users
        for listener in self.pop3:  # POP3 logins too, and its limits and timeouts
            listener.services.users = users
            listener.services.settings = replace(
                listener.services.settings,
                idle_timeout=new.timeouts.pop3_idle,
                tls_handshake_timeout=new.timeouts.tls_handshake,
            )
        # the limiter keeps its counts; only its limits change
        self.auth_limiter.max_failures = new.limits.auth_failures
        self.auth_limiter.max_address_failures = new.limits.auth_address_failures
        self.auth_limiter.failure_delay = new.limits.auth_failure_delay
        self.pop3_clients.connections_per_ip = new.limits.connections_per_ip
        self.pop3_clients.rate.limit = new.limits.connection_rate
        self.router = prepared.router
        if prepared.new_tls is not None:
            self.tls = prepared.new_tls
        if self.tls is not None and prepared.tls_backend is not None and prepared.tls_files:
            self.tls.use(prepared.tls_backend, *prepared.tls_files)
        if self.smtp is not None:
            self.smtp.reconfigure(new.limits, new.timeouts)
        if self.part_time is not None:
            self.part_time.configure(new.etrn.held_domains, new.etrn.clients)
            if new.etrn.release_interval != old.etrn.release_interval:
                self._schedule_releases()
        if self.relay_agent is not None:
            self.relay_agent.reconfigure(prepared.relay_agent)
        if self.smtp is not None:
            self.smtp.client_names = self._client_names(new)
        if self.runner is not None:
            self.runner.reconfigure(backoff_policy(new), plan_limits(new))

    async def shutdown(self) -> None:
        for task in self._background:
            task.cancel()
        if self._release_task is not None:
            self._release_task.cancel()
        for listener in self.pop3:
            listener.close()
        # Our sessions and the workers' finish their transactions side by side; the control
        # socket stays up meanwhile (a worker may still forward an ETRN).
        stopping = [self.smtp.shutdown()] if self.smtp is not None else []
        grace = self.config.timeouts.shutdown_grace
        stopping += [listener.wait_closed(grace) for listener in self.pop3]
        if self.workers is not None:
            stopping.append(self.workers.stop(self.config.timeouts.shutdown_grace))
        await asyncio.gather(*stopping)
        if self.control is not None:
            await self.control.close()
        if self.runner is not None:
            await self.runner.stop(grace=self.config.timeouts.shutdown_grace)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner_task
        if self.relay_agent is not None:
            await self.relay_agent.close()
        await asyncio.to_thread(self.spool.close)
        if self._queue_lock is not None:
            self._queue_lock.release()
        log.info("stopped")
