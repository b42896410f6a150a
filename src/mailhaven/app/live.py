"""What a reload swaps: the configuration, the users file and the router built from both.

Roles that must see a reload at once (routing at RCPT, intake's alias expansion, the scheduler's
routes, local delivery's mailbox names) read through this one object instead of holding their
own copies, so a SIGHUP is one assignment (`swap`), never a half-applied state.
`prepare_mailboxes` readies the mail directories for them once, before the daemon serves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection

from mailhaven.app.settings import (
    build_router,
    build_users,
    folder_rules,
    mail_owner,
    mailbox_names,
    quota_rules,
)
from mailhaven.config import Config
from mailhaven.mailbox import migrate
from mailhaven.mailbox.folders import FolderRules
from mailhaven.mailbox.migrate import mail_domains
from mailhaven.mailbox.quota import QuotaRules
from mailhaven.mailbox.users import UserDB
from mailhaven.routing.route import Route
from mailhaven.routing.router import Router
from mailhaven.routing.srs import SRS

log = logging.getLogger("mailhaven.master")


def parked_domains(config: Config, users: UserDB) -> list[str]:
    """Domains with a mail directory that are no longer local: their queued mail is held
    (`Router` parked_domains), not relayed to wherever their MX points. Logged."""
    parked = [d for d in mail_domains(config.mail_root) if d not in users.domains]
    for domain in parked:
        log.warning("domain %s is not a local domain any more: mail queued for it is held"
                    " (add it back to local_domains to deliver it)", domain)
    return parked


class Live:
    """The current configuration, users and router."""

    def __init__(self, config: Config, users: UserDB | None = None) -> None:
        self.config = config
        self.users = users if users is not None else build_users(config)
        #: the SRS rewriter (`app.outbound.load_srs`), set with the engine and on reload
        self.srs: SRS | None = None
        self.router = build_router(
            config, self.users, self.reverse_srs, parked_domains(config, self.users)
        )
        self._mailboxes = mailbox_names(config, self.users)

    def swap(self, config: Config, users: UserDB, router: Router) -> None:
        self.config, self.users, self.router = config, users, router
        self._mailboxes = mailbox_names(config, users)

    def reverse_srs(self, address: str) -> str | None:
        return self.srs.reverse(address, time.time()) if self.srs is not None else None

    def route(self, address: str) -> Route:
        return self.router.route(address)

    def expand(self, address: str) -> list[str]:
        return self.router.expand(address)

    def mailboxes(self) -> Collection[str]:
        return self._mailboxes()

    def quotas(self) -> QuotaRules:
        return quota_rules(self.config)

    def folders(self) -> FolderRules:
        return folder_rules(self.config)


def prepare_mailboxes(live: Live) -> None:
    """The daemon, before anything delivers or reads mail: the upgrade to `<domain>/<user>`
    Maildirs (`mailbox.migrate`), and the configured owners and modes (shared with Dovecot).
    Then the router again: the domains' directories exist now, so a domain removed later is
    known as one (`parked_domains`). Blocking: run it in a thread."""
    config, mail = live.config, mail_owner(live.config)
    try:
        if config.mailbox.mail_user or config.mailbox.mail_group:
            mail.apply_to_dir(config.mail_root)
        live.users.apply_file_owner()
    except PermissionError as err:  # an unprivileged daemon: say so, deliver anyway
        log.warning("mail owner settings not applied: %s", err)
    migrate.migrate(config.mail_root, live.users, config.local_domains, mail)
    live.swap(config, live.users, build_router(
        config, live.users, live.reverse_srs, parked_domains(config, live.users)
    ))
