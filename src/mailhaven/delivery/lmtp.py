"""The LMTP delivery agent (Postfix lmtp(8)): final delivery into a mail store over RFC 2033.

In: a `DeliveryRequest` whose route is `Route("lmtp", nexthop)`, the next hop being
`unix:/path/to/socket` or `[host]:port` / `host:port` (port 24 by default, RFC 2033 §5), from a
transport-map entry such as `lmtp:unix:/run/dovecot/lmtp`. Out: a `DeliveryResult`, one `Reply`
per recipient and the server that gave them (`localhost[/path]` or `host[ip]:port`) for the log.

LMTP gives one reply per recipient after the end of data (the client core's LMTP mode), so each
recipient's fate is its own: Dovecot may store alice's copy (250), defer bob's for quota (452
4.2.2) and refuse carol (550 5.1.1) in one transaction; the scheduler records each.

Failures that are about the store, not the recipient, are temporary: the socket is missing or
refuses (Dovecot down), the greeting or LHLO fails, the connection drops. The mail stays queued
and is retried; a recipient whose 250 already came is not sent again (RFC 2033 §4.2 warns that a
connection lost after some replies may otherwise duplicate). Only a 5xx the server gave for a
recipient bounces.

No TLS and no AUTH: LMTP is for a store on the same host or a trusted network (RFC 2033 §1);
use a unix socket where you can. One connection per request, closed after QUIT.

Trust: next hops come from the configuration (checked by `config.check_lmtp_hop`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mailhaven.delivery.base import DeliveryRequest, DeliveryResult
from mailhaven.delivery.relay import split_nexthop
from mailhaven.delivery.smtp_connection import SessionFailure, SMTPClientConnection
from mailhaven.net.stream import open_stream, unix_dialer
from mailhaven.proto.replies import Reply
from mailhaven.proto.smtp_client import MailTransaction, Timeouts

log = logging.getLogger("mailhaven.lmtp")

#: RFC 2033 §5: LMTP must not be on port 25; 24 is the port IANA assigned.
LMTP_PORT = 24


@dataclass(frozen=True, slots=True)
class LmtpTarget:
    """Where an LMTP server listens: a unix-domain socket, or a TCP host and port."""

    host: str
    port: int = LMTP_PORT
    unix_path: str | None = None


def parse_target(nexthop: str) -> LmtpTarget:
    """`unix:/run/dovecot/lmtp`, `[127.0.0.1]:24`, `store.example:2424` -> `LmtpTarget`."""
    if nexthop.startswith("unix:"):
        return LmtpTarget("localhost", unix_path=nexthop[5:])
    host, port, _mx = split_nexthop(nexthop, LMTP_PORT)
    return LmtpTarget(host, port)


def temporary(reply: Reply) -> Reply:
    """A session-level failure as a deferral: a store that says 5xx to LHLO is misconfigured,
    which is no reason to bounce the mail (Postfix soft-bounces such LMTP failures too)."""
    if not reply.is_permanent:
        return reply
    enhanced = "4" + reply.enhanced[1:] if reply.enhanced else "4.3.0"
    return Reply(451, f"LMTP server said: {reply.one_line()}", enhanced)


class LmtpAgent:
    """`DeliveryAgent` for transport "lmtp"."""

    def __init__(self, helo_name: str, *, timeouts: Timeouts | None = None) -> None:
        self.helo_name = helo_name
        self.timeouts = timeouts or Timeouts()

    async def deliver(self, request: DeliveryRequest) -> DeliveryResult:
        target = parse_target(request.route.nexthop)
        recipients = tuple(dict.fromkeys(request.recipients))
        unix = target.unix_path
        conn = await SMTPClientConnection.connect(
            target.host,
            target.port,
            helo_name=self.helo_name,
            address=unix,
            tls_policy="none",
            timeouts=self.timeouts,
            lmtp=True,
            dial=unix_dialer(unix) if unix is not None else open_stream,
        )
        if isinstance(conn, SessionFailure):
            reply = temporary(conn.reply)
            log.info("%s: lmtp to %s: %s", request.queue_id, request.route.nexthop,
                     reply.one_line())
            return DeliveryResult({r: reply for r in recipients}, conn.relay)
        txn = MailTransaction.from_envelope(request.envelope, recipients, request.size)
        async with conn:
            with request.open_message() as message:
                results = await conn.send(txn, message)
        return DeliveryResult(results, conn.relay)
