"""SIGHUP: read and check a whole new configuration before anything of it is applied.

Everything that can fail (the file, its users file, the relay's resolver configuration, a
renewed or first certificate) is made here, off to the side (`prepare_reload`); `apply_reload`
then swaps it in with assignments that cannot fail, so a reload is all of the new configuration
or none of it. What needs a task (closing the replaced signing hook, opening the greylist
database, releasing mail of domains that are local again) is returned to `App`, which owns the
tasks.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from mailhaven import config as configuration
from mailhaven.app.engine import Engine, client_names
from mailhaven.app.front import Front
from mailhaven.app.listeners import tls_files
from mailhaven.app.live import Live, parked_domains
from mailhaven.app.outbound import build_outbound, load_srs
from mailhaven.app.settings import (
    backoff_policy,
    build_relay_agent,
    build_router,
    build_users,
    plan_limits,
)
from mailhaven.checks.services import CheckServices
from mailhaven.config import Config
from mailhaven.delivery.relay import RelayAgent
from mailhaven.intake.cleanup import OutboundHook
from mailhaven.mailbox.users import UserDB, UsersFileError
from mailhaven.net.tls import ReloadableTLS, build_server_context
from mailhaven.routing.router import Router
from mailhaven.routing.srs import SRS
from mailhaven.signing.outbound import Outbound

log = logging.getLogger("mailhaven.master")

#: Settings a reload keeps (logged when the file changes them): the listening sockets, the
#: processes, the loop and the queue's place are made once; the host name is baked into the
#: engine (Received: fields, bounces, Maildir names, HELO), so it changes all at once or not.
RESTART_ONLY = (
    "listen", "state_dir", "smtp_processes", "event_loop", "hostname", "user", "group", "mailbox"
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
    #: outbound authentication: SRS secrets and DKIM keys read afresh (`app.outbound`)
    srs: SRS | None = None
    outbound: Outbound | None = None


def prepare_reload(
    current: Config,
    *,
    has_tls: bool,
    reverse_srs: Callable[[str], str | None] | None = None,
) -> PreparedReload:
    """Everything a reload needs that can fail, made without touching what runs: the
    configuration, its users file and its certificate (read afresh: a renewal). Raises
    `ConfigError` or `UsersFileError`."""
    new = configuration.load(current.source)
    kept = tuple(n for n in RESTART_ONLY if getattr(new, n) != getattr(current, n))
    new = replace(new, **{name: getattr(current, name) for name in RESTART_ONLY})
    users = build_users(new)
    users.load()
    try:
        relay_agent = build_relay_agent(new)
    except OSError as err:  # the system's resolver configuration
        raise configuration.ConfigError(f"relay: {err}") from None
    router = build_router(new, users, reverse_srs, parked_domains(new, users))
    srs = load_srs(new)
    outbound = build_outbound(new, router.is_local_domain, srs)
    prepared = PreparedReload(new, users, router, relay_agent, kept, srs=srs, outbound=outbound)
    try:
        files = tls_files(new) if has_tls or new.tls.cert else None
        if files is None:
            return prepared
        if not has_tls:  # a certificate where there was none: STARTTLS on the MX
            return replace(prepared, new_tls=ReloadableTLS(*files))
        return replace(prepared, tls_backend=build_server_context(*files), tls_files=files)
    except (OSError, ssl.SSLError) as err:
        where = new.tls.cert or new.state_path / "tls"  # the configured or self-signed
        raise configuration.ConfigError(f"TLS certificate {where}: {err}") from None


def prepare_or_refuse(
    current: Config,
    *,
    has_tls: bool,
    reverse_srs: Callable[[str], str | None] | None = None,
) -> PreparedReload | None:
    """`prepare_reload`, or None with the reason logged: the old configuration stays."""
    try:
        return prepare_reload(current, has_tls=has_tls, reverse_srs=reverse_srs)
    except (configuration.ConfigError, UsersFileError) as err:
        log.error("reload: refused, keeping the old configuration (nothing applied): %s", err)
        return None


def announce(prepared: PreparedReload) -> None:
    """After `apply_reload`: what was kept for the next restart, deprecations, and "applied";
    then the new log level, last, so that line is logged even when the level hides it (as
    `maillog.setup` does)."""
    for name in prepared.kept:
        log.warning("reload: %s changed; it takes effect at the next restart", name)
    for note in prepared.config.deprecated:
        log.warning("reload: %s", note)
    log.info("reload: configuration %s applied", prepared.config.source or "(built-in defaults)")
    logging.getLogger("mailhaven").setLevel(prepared.config.log_level.upper())


@dataclass(frozen=True)
class Applied:
    """What is left for the owner of the tasks after `apply_reload`."""

    #: the signing hook the reload replaced: its helper process is to be closed
    old_outbound: OutboundHook | None = None
    #: `[etrn] release_interval` changed: the periodic release starts again
    releases_changed: bool = False
    #: greylisting was turned on: its database is to be opened
    open_greylist: bool = False
    #: domains local again (their held mail is to be released)
    returned: frozenset[str] = field(default_factory=frozenset)


def apply_reload(
    prepared: PreparedReload,
    live: Live,
    front: Front,
    engine: Engine | None,
    checks: CheckServices,
) -> Applied:
    """Swap in a prepared configuration; nothing here can fail half-way. Counters (failed
    logins, connections per client) are kept: only their limits change."""
    old, new = live.config, prepared.config
    users = prepared.users
    returned = frozenset(set(users.domains) - set(live.users.domains))
    live.swap(new, users, prepared.router)
    live.srs = prepared.srs
    old_outbound = None
    if engine is not None:  # DKIM keys, ARC key and SRS secrets read afresh
        old_outbound, engine.intake.outbound = engine.intake.outbound, prepared.outbound
    front.reconfigure(new, users)
    if prepared.new_tls is not None:
        front.tls = prepared.new_tls
    if front.tls is not None and prepared.tls_backend is not None and prepared.tls_files:
        front.tls.use(prepared.tls_backend, *prepared.tls_files)
    if engine is None:
        return Applied(old_outbound)
    engine.smtp.reconfigure(new.limits, new.timeouts)
    engine.part_time.configure(new.etrn.held_domains, new.etrn.clients)
    engine.relay_agent.reconfigure(prepared.relay_agent)
    engine.smtp.client_names = client_names(new, engine.relay_agent)
    engine.runner.reconfigure(backoff_policy(new), plan_limits(new))
    checks.reconfigure(new)
    return Applied(
        old_outbound,
        releases_changed=new.etrn.release_interval != old.etrn.release_interval,
        open_greylist=new.checks.greylist.enabled and checks.greylist is None,
        returned=returned,
    )
