"""Part-time hosts (RFC 1985 ETRN): hold their domains' mail, release it when they ask.

Mail for a held domain is routed to the `hold` transport and waits in the queue without delivery
attempts. `ETRN example.org` (or `@example.org` for it and its subdomains) from an allowed
client, or the periodic schedule, opens a *release window* for the domain: for a few minutes
the route becomes a normal relay route (the domain's transport-map next hop, else its MX), the
held recipients become due, and the scheduler delivers them on a new connection to that host,
not over the ETRN session (RFC 1985 §3).

Replies (RFC 1985 §5): 250 queuing started, 251 no messages waiting, 253 <n> pending messages
started, 458 unable to queue, 459 node not allowed. `#queue` names are not supported (458).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence

from mailhaven.proto import replies as r
from mailhaven.proto.replies import Reply
from mailhaven.routing.route import Route, transport_route

log = logging.getLogger("mailhaven.smtpd")

#: How long a released domain routes normally, so its mail is not held again at once.
RELEASE_WINDOW = 600.0


class PartTimeHosts:
    """Keeps the release windows and answers ETRN."""

    def __init__(
        self,
        *,
        held_domains: Collection[str],
        clients: Sequence[str],
        release: Callable[[str], Awaitable[int]],
        wake: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
        elsewhere: Callable[[Sequence[str]], Awaitable[int]] | None = None,
    ) -> None:
        self.configure(held_domains, clients)
        self._release = release
        self._wake = wake
        self._clock = clock
        #: the same release in the other processes' queue shards (`mailhaven.runtime.workers`)
        self._elsewhere = elsewhere
        self._open_until: dict[str, float] = {}

    def configure(self, held_domains: Collection[str], clients: Sequence[str]) -> None:
        """The held domains and the clients allowed to say ETRN (again on a reload; open
        release windows stay open)."""
        self.held = {d.lower().rstrip(".") for d in held_domains}
        self.clients = [ipaddress.ip_network(c, strict=False) for c in clients]

    def releasing(self, domain: str) -> bool:
        until = self._open_until.get(domain.lower())
        return until is not None and until > self._clock()

    def route(
        self, inner: Callable[[str], Route], release_route: Callable[[str], Route]
    ) -> Callable[[str], Route]:
        """Wrap the router: a held domain in its release window routes like any relay domain."""

        def route(address: str) -> Route:
            found = inner(address)
            if found.transport == "hold" and self.releasing(found.nexthop):
                return release_route(found.nexthop)
            return found

        return route

    def _allowed(self, client_ip: str) -> bool:
        try:
            ip = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        return any(ip in net for net in self.clients)

    async def release(self, domains: Collection[str]) -> int:
        """Open the release window for `domains` and make their held mail due now; returns the
        number of messages released (a message held for two of the domains counts twice),
        here and, with worker processes, in their shards too."""
        count = 0
        until = self._clock() + RELEASE_WINDOW
        for domain in domains:
            self._open_until[domain] = until
            count += await self._release(domain)
        self._wake()
        if self._elsewhere is not None:
            count += await self._elsewhere(sorted(domains))
        return count

    async def etrn(self, client_ip: str, argument: str) -> Reply:
        """Answer one ETRN command (the SMTP core has checked the syntax and the session)."""
        if not self._allowed(client_ip):
            return r.etrn_not_allowed(argument, client_ip)
        if argument.startswith("#"):
            return r.etrn_unable(argument)
        subdomains = argument.startswith("@")
        name = argument.lstrip("@").lower().rstrip(".")
        domains = [d for d in self.held if d == name or (subdomains and d.endswith("." + name))]
        if not domains:
            return r.etrn_unknown_node(argument)
        count = await self.release(domains)
        log.info("ETRN %s from [%s]: %d message(s) released", argument, client_ip, count)
        if count == 0:
            return r.etrn_nothing_waiting(argument)
        return r.etrn_started(count, argument)

    async def release_all(self) -> int:
        """The schedule: release every held domain."""
        return await self.release(sorted(self.held))

    async def release_periodically(self, interval: float) -> None:
        """The `etrn.release_interval` schedule: release every held domain every `interval`
        seconds, for a part-time host that never says ETRN (runs until cancelled)."""
        import asyncio

        while True:
            await asyncio.sleep(interval)
            count = await self.release_all()
            log.info("scheduled release of part-time domains: %d message(s)", count)


def release_route(domain: str, transport_map: Mapping[str, str], relayhost: str) -> Route:
    """Where a released part-time domain's mail goes: its transport-map next hop, else the
    relayhost, else the domain's MX."""
    return transport_route(transport_map.get(domain) or relayhost or domain)
