"""What a reload swaps: the configuration, the users file and the router built from both.

Roles that must see a reload at once (routing at RCPT, intake's alias expansion, the scheduler's
routes, local delivery's mailbox names) read through this one object instead of holding their
own copies, so a SIGHUP is one assignment (`swap`), never a half-applied state.
"""

from __future__ import annotations

import time
from collections.abc import Collection

from mailhaven.app.settings import build_router, mailbox_names
from mailhaven.config import Config
from mailhaven.mailbox.users import UserDB
from mailhaven.routing.route import Route
from mailhaven.routing.router import Router
from mailhaven.routing.srs import SRS


class Live:
    """The current configuration, users and router."""

    def __init__(self, config: Config, users: UserDB | None = None) -> None:
        self.config = config
        self.users = users if users is not None else UserDB(config.users_path)
        #: the SRS rewriter (`app.outbound.load_srs`), set with the engine and on reload
        self.srs: SRS | None = None
        self.router = build_router(config, self.users, self.reverse_srs)

    def swap(self, config: Config, users: UserDB, router: Router) -> None:
        self.config, self.users, self.router = config, users, router

    def reverse_srs(self, address: str) -> str | None:
        return self.srs.reverse(address, time.time()) if self.srs is not None else None

    def route(self, address: str) -> Route:
        return self.router.route(address)

    def expand(self, address: str) -> list[str]:
        return self.router.expand(address)

    def mailboxes(self) -> Collection[str]:
        return mailbox_names(self.config, self.users)()
