"""SIGHUP: read and check a whole new configuration before anything of it is applied.

Everything that can fail (the file, its users file, the relay's resolver configuration, a
renewed or first certificate) is made here, off to the side; `App` then swaps it in with
assignments that cannot fail, so a reload is all of the new configuration or none of it.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from mailhaven import config as configuration
from mailhaven.app.listeners import tls_files
from mailhaven.app.live import parked_domains
from mailhaven.app.outbound import build_outbound, load_srs
from mailhaven.app.settings import build_relay_agent, build_router, build_users
from mailhaven.config import Config
from mailhaven.delivery.relay import RelayAgent
from mailhaven.mailbox.users import UserDB
from mailhaven.net.tls import ReloadableTLS, build_server_context
from mailhaven.routing.router import Router
from mailhaven.routing.srs import SRS
from mailhaven.signing.outbound import Outbound

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
