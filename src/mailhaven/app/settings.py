"""From the configuration to each role's own settings object (pure translation, no I/O).

Every role takes plain settings, not the `Config`: these functions are the only place that knows
both, so a renamed key changes one line here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterator, KeysView, Sequence
from typing import cast

from mailhaven.config import Config, parse_hostport
from mailhaven.delivery.relay import RelayAgent, RelaySettings, Smarthost, TLSPolicy
from mailhaven.mailbox import owner
from mailhaven.mailbox.folders import FolderRules
from mailhaven.mailbox.quota import QuotaRules
from mailhaven.mailbox.users import UserDB
from mailhaven.net.dns import Resolver
from mailhaven.proto.smtp_client import Credentials
from mailhaven.proto.smtp_server import ServerSettings
from mailhaven.routing.router import Router
from mailhaven.scheduler.backoff import BackoffPolicy
from mailhaven.scheduler.plan import Limits as PlanLimits


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
    """Current mailbox names: `local_users` plus the users file (reloaded when it changes).
    A bare `local_users` name is a mailbox at every local domain (`postmaster`). Each call
    is a snapshot that copies nothing: every message asks, and a host may have many users."""
    fixed = frozenset(
        name if "@" in name else f"{name}@{domain}"
        for name in (u.lower() for u in config.local_users)
        for domain in users.domains or config.local_domains
    )

    def names() -> Collection[str]:
        return MailboxNames(fixed, users.current_names())

    return names


class MailboxNames(Collection[str]):
    """`local_users` and the users file's names as one collection, without a union copy."""

    __slots__ = ("_fixed", "_users")

    def __init__(self, fixed: frozenset[str], users: KeysView[str]) -> None:
        self._fixed = fixed
        self._users = users

    def __contains__(self, name: object) -> bool:
        return name in self._fixed or name in self._users

    def __iter__(self) -> Iterator[str]:
        yield from self._fixed
        yield from (name for name in self._users if name not in self._fixed)

    def __len__(self) -> int:
        return len(self._fixed) + sum(1 for name in self._users if name not in self._fixed)


def build_users(config: Config) -> UserDB:
    """The users file with the local domains (virtual users) and its configured mode/group
    (`[mailbox] users_file_*`; the group name is looked up here)."""
    box = config.mailbox
    return UserDB(
        config.users_path,
        domains=config.local_domains,
        file_mode=box.users_file_mode or None,
        file_group=owner.group_id(box.users_file_group),
    )


def mail_owner(config: Config) -> owner.MailOwner:
    """Owner and modes of Maildir files (`[mailbox] mail_user`, ...; names looked up here)."""
    box = config.mailbox
    return owner.resolve_owner(box.mail_user, box.mail_group, box.dir_mode, box.file_mode)


# --- mailboxes: quotas and folders (issue 20) ------------------------------------------------


@functools.lru_cache(maxsize=4)
def _quota_rules(
    default: str, domains: tuple[tuple[str, str], ...], users: tuple[tuple[str, str], ...]
) -> QuotaRules:
    return QuotaRules.parse(default, dict(domains), dict(users))


def quota_rules(config: Config) -> QuotaRules:
    """`[quota]` as rules, parsed once per distinct configuration (asked per delivery)."""
    q = config.quota
    return _quota_rules(q.default, tuple(q.domains.items()), tuple(q.users.items()))


def folder_rules(config: Config) -> FolderRules:
    """`[folders]` with the recipient delimiter that makes plus addresses."""
    return FolderRules(
        plus_folders=config.folders.plus_address,
        delimiters=config.recipient_delimiter,
        junk=config.folders.junk,
    )


def build_router(
    config: Config,
    users: UserDB,
    reverse_srs: Callable[[str], str | None] | None = None,
    parked: Sequence[str] = (),
) -> Router:
    """`parked`: domains with Maildirs that are no longer local (`migrate.parked_domains`)."""
    aliases: dict[str, Sequence[str]] = dict(config.aliases)
    return Router(
        local_domains=config.local_domains,
        mailboxes=mailbox_names(config, users),
        aliases=aliases,
        catch_all=config.catch_all or None,
        recipient_delimiter=config.recipient_delimiter,
        trusted_networks=config.trusted_networks,
        relay_domains=config.relay_domains,
        relayhost=config.relayhost or None,
        held_domains=config.etrn.held_domains,
        transport_map=config.relay.transport,
        reverse_srs=reverse_srs,  # bounces to forwarded mail's SRS senders (routing.srs)
        parked_domains=parked,
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
