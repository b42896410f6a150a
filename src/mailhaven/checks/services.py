"""The shared state behind the gates, built from the configuration by the composition root.

In: a `Config` (again at each reload) and an `alert(subject, text)` callback (the application
mails the postmaster). Out: a `Gate` per listener kind: the MX's screens its clients (client
checks, DNS lists, greylisting), submission's only applies the access lists and the sender
limits. What must outlive a reload lives here and is kept: the DNS list cache, the greylist
database, the sender limiter's counts; a reload only changes their settings.

`open` and `close` run the greylist database's file work in a thread (the event loop never
waits on the disk).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from mailhaven.checks.dnsbl_lookup import DnsblLookup
from mailhaven.checks.gate import Gate, GateSettings
from mailhaven.checks.greylist import GreylistSettings
from mailhaven.checks.greylist_store import GreylistStore
from mailhaven.checks.sender_limits import SenderLimiter
from mailhaven.config import Config
from mailhaven.net.dnslist import ListResolver
from mailhaven.net.hostport import parse_hostport

log = logging.getLogger("mailhaven.checks")

GREYLIST_FILE = "greylist.sqlite"


def greylist_settings(config: Config) -> GreylistSettings:
    g = config.checks.greylist
    return GreylistSettings(
        delay=g.delay,
        retry_window=g.retry_window,
        allow_lifetime=g.allow_lifetime,
        auto_allow_after=g.auto_allow_after,
        max_entries=g.max_entries,
    )


class CheckServices:
    def __init__(self, config: Config, *, alert: Callable[[str, str], None] | None = None,
                 wall: Callable[[], float] | None = None) -> None:
        self._alert = alert
        self._wall = wall
        nameservers = [parse_hostport(n) for n in config.relay.nameservers] or None
        self.resolver = ListResolver(nameservers, config.checks.dnsbl.wait)
        self.dnsbl = DnsblLookup(self.resolver)
        self.greylist: GreylistStore | None = None
        limits = config.checks.sender_limits
        self.senders = SenderLimiter(
            messages=limits.messages, recipients=limits.recipients, window=limits.window
        )
        self.config = config
        self._gates: dict[bool, Gate] = {}

    async def open(self) -> None:
        """Open the greylist database when greylisting is on (and purge what has expired)."""
        if self.config.checks.greylist.enabled and self.greylist is None:
            store = GreylistStore(self.config.state_path / GREYLIST_FILE,
                                  greylist_settings(self.config))
            await asyncio.to_thread(_open_and_purge, store, self._now())
            self.greylist = store
            self._gates.clear()

    def _now(self) -> float:
        return self._wall() if self._wall is not None else time.time()

    def gate(self, *, screen: bool) -> Gate:
        """The gate for the MX (`screen`) or for submission; built once per configuration."""
        gate = self._gates.get(screen)
        if gate is None:
            config = self.config
            alert = self._alert if config.checks.sender_limits.notify_postmaster else None
            gate = self._gates[screen] = Gate(
                GateSettings.from_config(config, screen=screen),
                dnsbl=self.dnsbl,
                greylist=self.greylist if config.checks.greylist.enabled else None,
                senders=self.senders,
                alert=alert,
                wall=self._wall or time.time,
            )
        return gate

    def reconfigure(self, config: Config) -> None:
        """A reload: new settings, the same caches, counts and database (call `open` after:
        greylisting may just have been turned on)."""
        self.config = config
        nameservers = [parse_hostport(n) for n in config.relay.nameservers] or None
        if nameservers != self._nameservers():
            self.resolver = ListResolver(nameservers, config.checks.dnsbl.wait)
            self.dnsbl = DnsblLookup(self.resolver)
        self.resolver.timeout = config.checks.dnsbl.wait
        limits = config.checks.sender_limits
        self.senders.messages, self.senders.recipients = limits.messages, limits.recipients
        self.senders.window = limits.window
        if self.greylist is not None:
            self.greylist.settings = greylist_settings(config)
        self._gates.clear()

    def _nameservers(self) -> list[tuple[str, int]] | None:
        return self.resolver.nameservers

    async def close(self) -> None:
        if self.greylist is not None:
            await asyncio.to_thread(self.greylist.close)


def _open_and_purge(store: GreylistStore, now: float) -> None:
    store.open()
    store.purge(now)
