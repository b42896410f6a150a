"""Intake's hook for outbound authentication: DKIM for our mail, SRS and ARC for forwarded mail.

In: the message as intake is about to commit it (the body writer, the envelope, the final
recipients with the ones they were expanded from, and the header intake prepends). Out: the
envelope (with the SRS sender for the relayed copies in `extra`) and the header with the new
fields on top. Called once per message, before the commit, so the 250 covers a signed message
and a retry never signs twice.

Which mail gets what:
* **DKIM** (`signer`): mail that originates here -- an authenticated client, a trusted network
  (`trusted_networks`), `sendmail`/pickup and our own bounces (protocol `local`) -- when the
  From: domain, or the nearest parent domain, has keys. One signature per key.
* **SRS** (`mailhaven.routing.srs`): when an alias turned a recipient of ours into an address elsewhere
  and the envelope sender is not in one of our domains (or null). Only the relayed copies use
  the rewritten sender (`SRS_SENDER` in the envelope's `extra`, applied by
  `mailhaven.delivery.forwarded.RewrittenSender` around the relay agent); local copies keep the original.
* **ARC** (`arc`): the same forwarded mail, when it did not originate here (its checks ran).

Cost: reading the body back (already in memory below the spool's inline limit, else in a
worker thread), one body hash and one private-key operation per key (RSA-2048 about 0.3 ms,
Ed25519 a tenth of it). Below the inline limit the arithmetic runs on the event loop: in a
thread it holds the interpreter just as long (OpenSSL's signing does not release it here) and
adds the hand-over. Above it, the read and the hash (the part that grows) run in a thread.

SECURITY: whether mail "originates here" comes from the session (AUTH, client address), never
from the message; the From: domain only picks the key among ours.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace

from mailhaven.proto.envelope import Envelope
from mailhaven.routing.srs import SRS, SRS_SENDER
from mailhaven.signing import arc
from mailhaven.signing.canon import parse_fields, split_message
from mailhaven.signing.keys import SigningKey
from mailhaven.signing.signer import sign_message
from mailhaven.spool.message_writer import MessageWriter
from mailhaven.spool.records import QueuedRecipient

log = logging.getLogger("mailhaven.dkim")


def from_domain(header: bytes) -> str | None:
    """The domain of the first address in the first From: field (RFC 5322 §3.6.2)."""
    for field in parse_fields(header):
        if field.key == b"from":
            value = field.value.decode("utf-8", "replace").replace("\r\n", "")
            for _name, address in email.utils.getaddresses([value]):
                if "@" in address:
                    return address.rpartition("@")[2].strip().rstrip(".").lower() or None
            return None
    return None


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".") if "@" in address else ""


class Outbound:
    """Built by the composition root from the configuration; see the module docstring."""

    def __init__(
        self,
        *,
        keys: Mapping[str, Sequence[SigningKey]],
        arc_key: SigningKey | None,
        srs: SRS | None,
        server_id: str,
        is_local_domain: Callable[[str], bool],
        trusted_networks: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = {d.lower(): tuple(k) for d, k in keys.items() if k}
        self.arc_key = arc_key
        self.srs = srs
        self._server_id = server_id
        self._is_local = is_local_domain
        self._trusted = tuple(ipaddress.ip_network(n, strict=False) for n in trusted_networks)
        self._clock = clock

    def originates_here(self, envelope: Envelope) -> bool:
        if envelope.auth_user is not None or envelope.protocol == "local":
            return True
        try:
            ip = ipaddress.ip_address(envelope.client_address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._trusted)

    def keys_for(self, domain: str | None) -> tuple[SigningKey, ...]:
        """The keys of `domain` or of its nearest parent that has some (relaxed alignment,
        RFC 7489 §3.1.1, still passes DMARC for a subdomain's mail)."""
        while domain:
            if domain in self.keys:
                return self.keys[domain]
            domain = domain.partition(".")[2]
        return ()

    def _forwarded(self, recipients: Sequence[QueuedRecipient]) -> bool:
        return any(
            r.address != r.original
            and self._is_local(_domain_of(r.original) or "localhost")
            and not self._is_local(_domain_of(r.address) or "localhost")
            for r in recipients
        )

    async def apply(
        self,
        writer: MessageWriter,
        envelope: Envelope,
        recipients: Sequence[QueuedRecipient],
        header: bytes,
    ) -> tuple[Envelope, bytes]:
        origin = self.originates_here(envelope)
        forwarded = self._forwarded(recipients)
        foreign_sender = bool(envelope.sender) and not self._is_local(
            _domain_of(envelope.sender) or "localhost"
        )
        if forwarded and self.srs is not None and foreign_sender:
            rewritten = self.srs.forward(envelope.sender, self._clock())
            envelope = replace(envelope, extra={**envelope.extra, SRS_SENDER: rewritten})
            log.info("%s: sender <%s> rewritten to <%s> for forwarding",
                     writer.queue_id, envelope.sender, rewritten)
        seal = forwarded and not origin and self.arc_key is not None
        if not (origin and self.keys) and not seal:
            return envelope, header
        if writer.spilled:
            added = await asyncio.to_thread(self._fields, writer, header, origin, seal)
        else:
            added = self._fields(writer, header, origin, seal)
        return envelope, added + header

    def _fields(self, writer: MessageWriter, header: bytes, origin: bool, seal: bool) -> bytes:
        head, body = split_message(header + writer.head(writer.size))
        now = int(self._clock())
        added = b""
        if origin:
            domain = from_domain(head)
            keys = self.keys_for(domain)
            if keys:
                added = sign_message(keys, head, [body], now=now)
                for key in keys:
                    log.info("%s: DKIM-Signature field added (s=%s, d=%s)",
                             writer.queue_id, key.selector, key.domain)
        if seal and self.arc_key is not None:
            sealed = arc.seal(self.arc_key, head, [body], server_id=self._server_id, now=now)
            if sealed is not None:
                added = sealed + added
                log.info("%s: ARC set added (s=%s, d=%s)",
                         writer.queue_id, self.arc_key.selector, self.arc_key.domain)
        return added
