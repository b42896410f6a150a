"""The engine: every role of one queue shard, wired once, the same in the daemon and in workers.

receive (smtpd) -> intake -> spool -> scheduler -> delivery agents (local Maildir, relay)
-> bounce (back through intake). `build_engine` is the one function that knows how they
connect; each role gets only the narrow callables it needs, and settings that a reload changes
are read through `Live`. The result is immutable: a reload reconfigures the roles in place and
never rewires them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from mailhaven.app.live import Live
from mailhaven.app.outbound import build_outbound, load_srs
from mailhaven.app.settings import backoff_policy, build_relay_agent, mail_owner, plan_limits
from mailhaven.bounce.notifier import NoticeLimiter, Notifier
from mailhaven.config import Config
from mailhaven.delivery.base import DeliveryAgent
from mailhaven.delivery.forwarded import RewrittenSender
from mailhaven.delivery.lmtp import LmtpAgent
from mailhaven.delivery.local import LocalAgent
from mailhaven.delivery.relay import RelayAgent
from mailhaven.intake.cleanup import Intake
from mailhaven.net.client_names import ClientNames
from mailhaven.proto.envelope import Envelope
from mailhaven.proto.replies import Reply
from mailhaven.routing.held import PartTimeHosts, release_route
from mailhaven.scheduler.direct import DirectDoor
from mailhaven.scheduler.runner import Runner
from mailhaven.smtpd.profile import Writer
from mailhaven.smtpd.server import SMTPService
from mailhaven.spool.message_writer import MessageWriter
from mailhaven.spool.store import Spool

log = logging.getLogger("mailhaven.master")


@dataclass(frozen=True)
class Engine:
    """The roles of one queue shard."""

    spool: Spool
    relay_agent: RelayAgent
    runner: Runner
    part_time: PartTimeHosts
    intake: Intake
    smtp: SMTPService


class SpoolSink:
    """Adapts spool + intake to what an SMTP session needs (`smtpd.profile.MessageSink`)."""

    def __init__(self, spool: Spool, intake: Intake) -> None:
        self.spool = spool
        self.intake = intake

    def new_message(self) -> Writer:
        return self.spool.new_message()

    async def accept(
        self, writer: Writer, envelope: Envelope, tls: str | None, added: bytes = b""
    ) -> Reply:
        assert isinstance(writer, MessageWriter)
        outcome = await self.intake.submit(writer, envelope, tls=tls, added=added)
        return outcome.reply


def client_names(config: Config, relay_agent: RelayAgent) -> ClientNames | None:
    """Client name lookups through the relay's resolver (`[relay] nameservers`)."""
    if not (config.reverse_lookup or config.checks.client.reject_unknown_client):
        return None
    return ClientNames(relay_agent.resolver, config.timeouts.client_lookup)


def build_engine(
    live: Live,
    spool: Spool,
    *,
    release_elsewhere: Callable[[Sequence[str]], Awaitable[int]] | None = None,
) -> Engine:
    """Scheduler, delivery agents, bounces, intake and the SMTP service on `spool`.

    `release_elsewhere`: the daemon of worker processes opens ETRN release windows in their
    shards too."""
    config = live.config
    processes = max(1, config.smtp_processes)
    relay_agent = build_relay_agent(config)
    live.srs = load_srs(config)
    outbound = build_outbound(config, lambda d: live.router.is_local_domain(d), live.srs)
    agents: dict[str, DeliveryAgent] = {
        "relay": RewrittenSender(relay_agent),  # forwarded mail leaves with its SRS sender
        "lmtp": LmtpAgent(config.hostname),
    }
    local_agent = agents["local"] = LocalAgent(
        config.mail_root,
        config.hostname,
        users=live.mailboxes,
        quotas=live.quotas,
        folder_rules=live.folders,
        owner=mail_owner(config),
    )
    intake: Intake | None = None

    def the_intake() -> Intake:
        assert intake is not None
        return intake

    notifier = Notifier(
        spool,
        the_intake,
        hostname=config.hostname,
        postmaster=f"postmaster@{config.local_domains[0]}",
        # each process keeps its own count: its share of the limit (rounded up)
        limiter=NoticeLimiter(
            -(-config.queue.notice_rate_limit // processes), config.queue.notice_rate_window
        ),
    )
    runner: Runner | None = None

    def wake_everything() -> None:
        assert runner is not None
        runner.flush()

    part_time = PartTimeHosts(
        held_domains=config.etrn.held_domains,
        clients=config.etrn.clients,
        release=spool.release_domain,
        wake=wake_everything,
        elsewhere=release_elsewhere,
    )
    route = part_time.route(
        live.route,
        lambda domain: release_route(
            domain, live.config.relay.transport, live.config.relayhost
        ),
    )
    runner = Runner(
        spool,
        agents,
        route,
        on_failures=notifier.on_failures,
        on_delay=notifier.on_delay,
        policy=backoff_policy(config),
        limits=plan_limits(config),
    )
    door = DirectDoor(  # local-only mail goes into the Maildirs before the 250
        runner.active,
        local_agent,
        route,
        enabled=lambda: live.config.mailbox.delivery == "direct",
        users=live.mailboxes,
    )
    intake = Intake(
        door,
        hostname=config.hostname,
        expand=live.expand,
        held=lambda address: route(address).transport == "hold",
        outbound=outbound,
    )
    smtp = SMTPService(
        sink=SpoolSink(spool, intake),
        limits=config.limits,
        timeouts=config.timeouts,
        storage=spool.storage_refusal,
        client_names=client_names(config, relay_agent),
    )
    return Engine(spool, relay_agent, runner, part_time, intake, smtp)


async def release_local(engine: Engine, domains: Iterable[str]) -> None:
    """Mail held for a domain while it was not local (`live.parked_domains`) is delivered once
    the domain is local again (a reload, or at start-up)."""
    for domain in sorted(domains):
        if count := await engine.spool.release_domain(domain):
            log.info("domain %s is local: %d held message(s) released", domain, count)
    engine.runner.flush()
