"""The composition root: builds every role from the configuration and runs them in one process.

receive (smtpd) -> intake -> spool -> scheduler -> delivery agents (local Maildir; relay later)
-> bounce. Each role gets only the narrow callables it needs; nothing else here has logic.

Signals: SIGTERM/SIGINT stop gracefully (see `SMTPService.shutdown`); SIGHUP re-reads the
config file and applies what can change without restart (domains, users, aliases, trusted
networks, limits for new sessions). An invalid file is logged and the old config kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from pathlib import Path

from mailhaven import config as configuration
from mailhaven.config import Config
from mailhaven.delivery.local import LocalAgent
from mailhaven.envelope import Envelope
from mailhaven.intake import Intake
from mailhaven.notifier import Notifier
from mailhaven.proto.replies import Reply
from mailhaven.proto.smtp_server import ServerSettings
from mailhaven.routing import Router
from mailhaven.scheduler.backoff import BackoffPolicy
from mailhaven.scheduler.plan import Limits as PlanLimits
from mailhaven.scheduler.runner import Runner
from mailhaven.smtpd.policy import PolicySettings, SMTPPolicy
from mailhaven.smtpd.server import SMTPService
from mailhaven.smtpd.session import ListenerProfile, Writer
from mailhaven.spool.body import MessageWriter
from mailhaven.spool.store import Spool

log = logging.getLogger("mailhaven.master")


def read_user_names(path: Path) -> set[str]:
    """User names from a Dovecot-style passwd-file (`name:...` lines); missing file: none."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return set()
    names = set()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and ":" in line:
            names.add(line.split(":", 1)[0].lower())
    return names


def mailbox_names(config: Config) -> Callable[[], Collection[str]]:
    """Current mailbox names: `local_users` plus the users file (re-read, so edits apply)."""
    fixed = {u.lower() for u in config.local_users}
    users_path = config.users_path

    def names() -> Collection[str]:
        return fixed | read_user_names(users_path)

    return names


def build_router(config: Config) -> Router:
    mailboxes = mailbox_names(config)
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
    )


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
        starttls=starttls,
    )


class App:
    """One running mailhaven: call `await App(config).run()`; `stop()` from elsewhere."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.router = build_router(config)
        self.spool = Spool(config.spool_path)
        self._stop = asyncio.Event()
        self.smtp: SMTPService | None = None
        self.runner: Runner | None = None
        self.ready = asyncio.Event()

    # ------------------------------------------------------------------ wiring

    def _mx_profile(self) -> ListenerProfile:
        return ListenerProfile(
            name="smtp",
            settings=server_settings(self.config),
            policy=SMTPPolicy(lambda: self.router, PolicySettings()),
            tls_context=lambda: None,
        )

    async def start(self) -> None:
        config = self.config
        log.info(
            "starting mailhaven: hostname=%s state_dir=%s config=%s",
            config.hostname,
            config.state_path,
            config.source or "(built-in defaults)",
        )
        config.mail_root.mkdir(parents=True, exist_ok=True)
        report = await asyncio.to_thread(self.spool.open)
        del report
        agents = {
            "local": LocalAgent(
                config.mail_root, config.hostname, users=lambda: mailbox_names(self.config)()
            )
        }
        notifier = Notifier(
            self.spool,
            lambda: intake,
            hostname=config.hostname,
            postmaster=f"postmaster@{config.local_domains[0]}",
        )
        q = config.queue
        self.runner = Runner(
            self.spool,
            agents,
            lambda address: self.router.route(address),
            on_failures=notifier.on_failures,
            policy=BackoffPolicy(
                minimal=q.minimal_backoff,
                maximal=q.maximal_backoff,
                lifetime=q.lifetime,
                delay_warning=q.delay_warning or None,
            ),
            limits=PlanLimits(
                max_deliveries=q.concurrency,
                per_destination=q.destination_concurrency,
                per_delivery=q.recipients_per_transaction,
            ),
        )
        intake = Intake(
            self.spool,
            hostname=config.hostname,
            expand=lambda address: self.router.expand(address),
            wake=self.runner.wake,
        )
        self.smtp = SMTPService(
            sink=SpoolSink(self.spool, intake), limits=config.limits, timeouts=config.timeouts
        )
        for address in config.listen.smtp:
            await self.smtp.listen(address, self._mx_profile)
            log.info("smtp listening on %s", address)
        self._runner_task = asyncio.ensure_future(self.runner.run())
        self.ready.set()

    # ------------------------------------------------------------------ life cycle

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        await self.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self._stop.wait()
        await self.shutdown()
        return 0

    def stop(self) -> None:
        log.info("stopping: finishing transactions in flight")
        self._stop.set()

    def reload(self) -> None:
        path = self.config.source
        try:
            new = configuration.load(path)
        except configuration.ConfigError as err:
            log.error("reload: keeping the old configuration: %s", err)
            return
        # Listener addresses and the state directory need a restart; keep them.
        new = replace(new, listen=self.config.listen, state_dir=self.config.state_dir)
        self.config = new
        self.router = build_router(new)
        if self.smtp is not None:
            self.smtp.limits = new.limits
            self.smtp.timeouts = new.timeouts
        log.info("reload: configuration %s applied", path or "(built-in defaults)")

    async def shutdown(self) -> None:
        if self.smtp is not None:
            await self.smtp.shutdown()
        if self.runner is not None:
            await self.runner.stop(grace=self.config.timeouts.shutdown_grace)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner_task
        await asyncio.to_thread(self.spool.close)
        log.info("stopped")
