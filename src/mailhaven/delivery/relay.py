"""The remote delivery agent (Postfix smtp(8)): next hop -> MX hosts -> SMTP client.

In: a `DeliveryRequest` whose route is `relay` with a next hop that is either a domain (MX
lookup, RFC 5321 §5.1) or an explicit `[host]:port` / `host:port` (smarthost, transport map:
no MX lookup, as in Postfix's brackets). Out: a `DeliveryResult`, one `Reply` per recipient
and the host that answered (`host[ip]:port`) for the log and the DSN.

Order of trial: MX preference, random among equals (the DNS facade); each host's addresses in
turn; at most `max_hosts` hosts. A connection failure, a 4xx/5xx greeting or a failed EHLO moves
to the next host; once a transaction has started, its per-recipient replies are final for this
attempt. No host reachable: every recipient gets the last temporary error (4xx: retry later).
A null MX (RFC 7505) bounces at once with 5.1.10; a DNS temporary failure defers.

Connections are reused: after a transaction the connection is parked per destination for a
few seconds, so a burst of messages to one host costs one TCP+TLS handshake (RFC 5321 §4.5.4.1
encourages it). `close()` ends parked connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from mailhaven.delivery.base import DeliveryRequest, DeliveryResult
from mailhaven.delivery.smtp_connection import SessionFailure, SMTPClientConnection
from mailhaven.net.dns import LookupFailed, NullMX, Resolver, Target, parse_literal
from mailhaven.net.stream import Dialer, open_stream
from mailhaven.proto.replies import Reply
from mailhaven.proto.smtp_client import Credentials, MailTransaction, Timeouts

log = logging.getLogger("mailhaven.smtp")

TLSPolicy = Literal["none", "may", "encrypt", "verify"]
NO_ROUTE = Reply(451, "Error: no mail exchanger could be reached", "4.4.1")
#: How long a connection may wait idle for the next message to the same destination.
IDLE_REUSE = 5.0


@dataclass(frozen=True)
class RelaySettings:
    helo_name: str
    #: The SMTP port of MX hosts (25; tests point it at a loopback sink's port).
    port: int = 25
    tls_policy: TLSPolicy = "may"
    max_hosts: int = 5
    timeouts: Timeouts = field(default_factory=Timeouts)
    #: Names that are us: an MX pointing here is a loop (RFC 5321 §5.1).
    self_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Smarthost:
    """An explicit next hop with optional AUTH and its own TLS policy."""

    nexthop: str
    credentials: Credentials | None = None
    tls_policy: TLSPolicy = "may"


def split_nexthop(nexthop: str, default_port: int) -> tuple[str, int, bool]:
    """`[host]:port` -> (host, port, False: no MX lookup); `domain` -> (domain, port, True)."""
    mx = True
    host = nexthop
    port = default_port
    if host.startswith("["):
        inner, _, rest = host[1:].partition("]")
        host, mx = inner, False
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif host.count(":") == 1 and host.rpartition(":")[2].isdigit():
        host, _, p = host.rpartition(":")
        port = int(p)
    return host, port, mx


def _notify_passed(txn: MailTransaction, replies: Mapping[str, Reply]) -> list[str]:
    """Recipients that went with NOTIFY=SUCCESS (the core sends NOTIFY to a DSN peer) and
    were accepted."""
    return [
        spec.address
        for spec in txn.recipients
        if "SUCCESS" in (n.upper() for n in spec.notify)
        and (r := replies.get(spec.address)) is not None
        and r.is_success
    ]


class RelayAgent:
    """Delivers to other hosts; shared by all relay deliveries of the process."""

    def __init__(
        self,
        resolver: Resolver,
        settings: RelaySettings,
        *,
        smarthosts: Sequence[Smarthost] = (),
        dial: Dialer = open_stream,
    ) -> None:
        self.resolver = resolver
        self.settings = settings
        self._smarthosts = {s.nexthop: s for s in smarthosts}
        self._dial = dial
        self._parked: dict[tuple[str, int], list[tuple[float, SMTPClientConnection]]] = {}

    def reconfigure(self, other: RelayAgent) -> None:
        """Take `other`'s resolver, settings and smarthosts (a reload), keeping our parked
        connections; deliveries in flight finish with what they started with."""
        self.resolver, self.settings = other.resolver, other.settings
        self._smarthosts = other._smarthosts

    async def deliver(self, request: DeliveryRequest) -> DeliveryResult:
        nexthop = request.route.nexthop
        smarthost = self._smarthosts.get(nexthop)
        host, port, use_mx = split_nexthop(nexthop, self.settings.port)
        targets = await self._targets(host, use_mx)
        if isinstance(targets, NullMX | LookupFailed):
            return DeliveryResult({r: targets.reply for r in request.recipients}, "none")
        txn = MailTransaction.from_envelope(request.envelope, request.recipients, request.size)
        last: Reply = NO_ROUTE
        last_relay = "none"
        for target in targets:
            for address in target.addresses:
                conn = await self._connection(target.host, address, port, smarthost)
                if isinstance(conn, SessionFailure):
                    # relay "none" when no connection was made (Postfix logs relay=none)
                    last, last_relay = conn.reply, conn.relay
                    said = " ".join(x for x in last.lines if x)
                    if last.answered in ("greeting", "EHLO", "HELO"):
                        said = f"host {last_relay} refused to talk to me: {last.one_line()}"
                    elif last.answered is not None:
                        said = f"host {last_relay} said: {last.one_line()}"
                    log.info("%s: %s", request.queue_id, said)
                    continue
                with request.open_message() as body:
                    replies = await conn.send(txn, body)
                passed = _notify_passed(txn, replies) if conn.capabilities.has("DSN") else ()
                self._park(target.host, port, conn)
                return DeliveryResult(replies, conn.relay, frozenset(passed))
        return DeliveryResult({r: last for r in request.recipients}, last_relay)

    async def _targets(self, host: str, use_mx: bool) -> list[Target] | NullMX | LookupFailed:
        literal = parse_literal(host) if not use_mx else None
        if literal is not None or parse_literal(host) is not None:
            ip = literal or parse_literal(host)
            assert ip is not None
            return [Target(host, 0, (ip,))]
        if use_mx:
            return await self.resolver.resolve_targets(
                host, max_hosts=self.settings.max_hosts, self_names=self.settings.self_names
            )
        addresses = await self.resolver.resolve_addresses(host)
        if isinstance(addresses, LookupFailed):
            return addresses
        if not addresses:
            why = "Host found but no data record of requested type"
            text = f"Host or domain name not found. Name service error for name={host} type=A"
            return LookupFailed(Reply(451, f"{text}: {why}", "4.4.3"))
        return [Target(host, 0, tuple(addresses))]

    async def _connection(
        self, host: str, address: str, port: int, smarthost: Smarthost | None
    ) -> SMTPClientConnection | SessionFailure:
        now = time.monotonic()
        parked = self._parked.get((host, port), [])
        while parked:
            since, conn = parked.pop()
            if now - since < IDLE_REUSE and conn.usable:
                return conn
            conn.close()
        return await SMTPClientConnection.connect(
            host,
            port,
            helo_name=self.settings.helo_name,
            address=address,
            tls_policy=smarthost.tls_policy if smarthost else self.settings.tls_policy,
            credentials=smarthost.credentials if smarthost else None,
            timeouts=self.settings.timeouts,
            dial=self._dial,
        )

    def _park(self, host: str, port: int, conn: SMTPClientConnection) -> None:
        if conn.usable:
            self._parked.setdefault((host, port), []).append((time.monotonic(), conn))
        else:
            conn.close()

    async def close(self) -> None:
        for conns in self._parked.values():
            for _, conn in conns:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.quit(), 2)
                conn.close()
        self._parked.clear()
