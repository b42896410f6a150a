"""Client names: the reverse lookup with forward confirmation (FCrDNS) Postfix's smtpd does.

In: a client's IP address. Out: a `ClientName`, never an exception: the name to log as
`name[address]` and to write into `Received:`, and a warning to log when the address claims a
name that does not claim it back. As in Postfix, a name counts only when it is verified: the
PTR lookup of the address gives a name whose A/AAAA records include the address again. Anything
else is `unknown`: no PTR record, a malformed or numeric name, a name that resolves elsewhere
(warning: `hostname X does not resolve to address Y`), SERVFAIL or a timeout (Postfix's
temporary `unknown`; here we do not tell the two apart).

Bounded: the whole lookup (PTR plus the forward lookups of at most `MAX_PTR_NAMES` names, in
parallel) is cut at `timeout` seconds; answers are cached per address for their PTR TTL (at
most `MAX_TTL`, failures `FAILURE_TTL`), in at most `CACHE_SIZE` entries; concurrent sessions
from one address share one lookup in flight.

SECURITY: the reverse zone belongs to whoever owns the client's address, so a name is only
trusted once its own zone confirms it, and only LDH names (RFC 1123 §2.1) are ever used: a
name reaches log lines and trace headers.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from mailhaven.net.dns import LookupFailed, Resolver
from mailhaven.net.ipaddr import client_ip

#: Postfix uses the one name getnameinfo() returns; a few more cost nothing (in parallel),
#: and a hostile reverse zone cannot make us resolve hundreds.
MAX_PTR_NAMES = 4
#: Cached addresses; the oldest use goes first (an address flood cannot grow memory).
CACHE_SIZE = 10_000
#: The longest we trust an answer, whatever its TTL says.
MAX_TTL = 3600.0
#: How long `unknown` from a failed or timed-out lookup is kept, so a client that connects
#: again and again does not cost each of its sessions the whole timeout.
FAILURE_TTL = 60.0
#: RFC 1035 §2.3.4: 255 octets on the wire, 253 characters as text without the final dot.
MAX_NAME = 253
#: RFC 1123 §2.1 LDH labels (plus `_`, which Postfix's valid_hostname also accepts).
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


@dataclass(frozen=True, slots=True)
class ClientName:
    """`name` is verified, or `unknown`; `warning` says why a claimed name was not used."""

    name: str
    warning: str | None = None


UNKNOWN = ClientName("unknown")


def valid_hostname(name: str) -> bool:
    """An LDH host name that is not a dotted number (Postfix: "numeric hostname")."""
    labels = name.split(".")
    if len(name) > MAX_NAME or not all(_LABEL.fullmatch(label) for label in labels):
        return False
    return not labels[-1].isdigit()


class ClientNames:
    """FCrDNS with a cache; one per SMTP service (see the module docstring)."""

    def __init__(
        self,
        resolver: Resolver,
        timeout: float,
        *,
        cache_size: int = CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.resolver = resolver
        self.timeout = timeout
        self._cache_size = cache_size
        self._clock = clock
        #: address -> (expiry, answer), least recently used first
        self._cache: OrderedDict[str, tuple[float, ClientName]] = OrderedDict()
        self._pending: dict[str, asyncio.Future[tuple[ClientName, float]]] = {}

    async def lookup(self, address: str) -> ClientName:
        """The client's verified name or `unknown`, within `timeout` seconds."""
        now = self._clock()
        cached = self._cache.get(address)
        if cached is not None:
            if cached[0] > now:
                self._cache.move_to_end(address)
                return cached[1]
            del self._cache[address]
        task = self._pending.get(address)
        if task is None:
            task = self._pending[address] = asyncio.ensure_future(self._bounded(address))
            task.add_done_callback(lambda done: self._settle(address, done))
        # shielded: a session that goes away must not cancel the others' lookup
        found, _ttl = await asyncio.shield(task)
        return found

    def _settle(self, address: str, task: asyncio.Future[tuple[ClientName, float]]) -> None:
        self._pending.pop(address, None)
        if task.cancelled() or task.exception() is not None:
            return
        found, ttl = task.result()
        if ttl > 0:
            self._cache[address] = (self._clock() + ttl, found)
            self._cache.move_to_end(address)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    async def _bounded(self, address: str) -> tuple[ClientName, float]:
        try:
            async with asyncio.timeout(self.timeout):
                return await self._verify(address)
        except TimeoutError:
            return UNKNOWN, FAILURE_TTL

    async def _verify(self, address: str) -> tuple[ClientName, float]:
        """PTR, then A/AAAA of each name: the first name that leads back to `address` wins."""
        client = client_ip(address)
        if client is None:
            return UNKNOWN, 0.0
        ptr = await self.resolver.resolve_ptr(str(client))
        if isinstance(ptr, LookupFailed):
            return UNKNOWN, FAILURE_TTL
        ttl = min(float(ptr.ttl), MAX_TTL)
        if not ptr.names:
            return UNKNOWN, ttl
        names = [n for n in ptr.names[:MAX_PTR_NAMES] if valid_hostname(n)]
        if not names:
            claimed = ptr.names[0]
            kind = "numeric" if claimed.replace(".", "").isdigit() else "malformed"
            return ClientName("unknown", f"{kind} hostname: {claimed}"), ttl
        found = await asyncio.gather(*(self.resolver.resolve_addresses(n) for n in names))
        for name, addresses in zip(names, found, strict=True):
            if isinstance(addresses, list) and any(client_ip(a) == client for a in addresses):
                return ClientName(name), ttl
        if any(isinstance(a, LookupFailed) and not a.permanent for a in found):
            ttl = min(ttl, FAILURE_TTL)  # the name may well confirm once its DNS is back
        first = found[0]
        why = ""
        if isinstance(first, LookupFailed):
            why = ": name not found" if first.permanent else ": temporary failure"
        warning = f"hostname {names[0]} does not resolve to address {address}{why}"
        return ClientName("unknown", warning), ttl
