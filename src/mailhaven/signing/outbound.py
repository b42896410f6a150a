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
worker thread), one body hash and one private-key operation per key (Ed25519 far cheaper than
RSA-2048). Below the inline limit the parsing and the body hash run on the event
loop and the private-key operations of a message go, as one job, to a signing thread
(`worker`), or with `[dkim] helper` to the helper process (`helper`). Why a thread: the
`cryptography` package lets go of the interpreter lock while OpenSSL signs, so the arithmetic
runs on another core; made on the loop's thread, every signature lets go of the lock and must
win it back from the server's other threads (the spool writer), which can stall the loop longer
than the arithmetic takes. Above the inline limit, the read, the hash and the signing run in a worker
thread. ARC seals (forwarded mail only) are made in the signing thread too.

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

from mailhaven.net.ipaddr import client_ip
from mailhaven.proto.envelope import Envelope
from mailhaven.routing.srs import SRS, SRS_SENDER
from mailhaven.runtime.job_threads import JobThreads
from mailhaven.signing import arc
from mailhaven.signing.canon import Field, hash_body, parse_fields, split_message
from mailhaven.signing.helper import SigningHelper
from mailhaven.signing.keys import SigningKey
from mailhaven.signing.signer import (
    finish_field,
    header_hash_input,
    select_headers,
    sign_all,
    sign_message,
    signature_request,
)
from mailhaven.spool.message_writer import MessageWriter
from mailhaven.spool.records import QueuedRecipient

log = logging.getLogger("mailhaven.dkim")


def from_domain(header: bytes) -> str | None:
    """The domain of the first address in the first From: field (RFC 5322 §3.6.2)."""
    return from_domain_of(parse_fields(header))


def from_domain_of(fields: Iterable[Field]) -> str | None:
    """`from_domain` over fields already parsed."""
    for field in fields:
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
        helper: bool = False,
    ) -> None:
        self.keys = {d.lower(): tuple(k) for d, k in keys.items() if k}
        #: the private-key operations of DKIM signing in a helper process (`helper`)
        self.helper = (
            SigningHelper([k for ks in self.keys.values() for k in ks])
            if helper and self.keys else None
        )
        #: the private-key operations of messages below the inline limit: one thread, in order
        #: (`cryptography` lets go of the interpreter lock while OpenSSL signs, so the
        #: arithmetic runs on another core while the loop serves other sessions)
        self.signing = JobThreads("dkim-sign", 1)
        self.arc_key = arc_key
        self.srs = srs
        self._server_id = server_id
        self._is_local = is_local_domain
        self._trusted = tuple(ipaddress.ip_network(n, strict=False) for n in trusted_networks)
        self._clock = clock

    def originates_here(self, envelope: Envelope) -> bool:
        if envelope.auth_user is not None or envelope.protocol == "local":
            return True
        ip = client_ip(envelope.client_address)
        return ip is not None and any(ip in net for net in self._trusted)

    def keys_for(self, domain: str | None) -> tuple[SigningKey, ...]:
        """The keys of `domain` or of its nearest parent that has some (relaxed alignment,
        RFC 7489 §3.1.1, still passes DMARC for a subdomain's mail)."""
        while domain:
            if domain in self.keys:
                return self.keys[domain]
            domain = domain.partition(".")[2]
        return ()

    def _local(self, address: str) -> bool:
        """An address without a domain (`postmaster`, sendmail's `root`) is local, as routing
        takes it."""
        domain = _domain_of(address)
        return not domain or self._is_local(domain)

    def _forwarded(self, recipients: Sequence[QueuedRecipient]) -> bool:
        return any(
            r.address != r.original and self._local(r.original) and not self._local(r.address)
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
        foreign_sender = bool(envelope.sender) and not self._local(envelope.sender)
        if forwarded and self.srs is not None and foreign_sender:
            rewritten = self.srs.forward(envelope.sender, self._clock())
            envelope = replace(envelope, extra={**envelope.extra, SRS_SENDER: rewritten})
            log.info("%s: sender <%s> rewritten to <%s> for forwarding",
                     writer.queue_id, envelope.sender, rewritten)
        seal = forwarded and not origin and self.arc_key is not None
        if not (origin and self.keys) and not seal:
            return envelope, header
        qid = writer.queue_id
        if writer.spilled:  # a large body: read and hash it off the loop, sign there too
            added = await asyncio.to_thread(self._fields_in_thread, writer, header, origin, seal)
            return envelope, added + header
        head, body = split_message(header + writer.head(writer.size))
        now = int(self._clock())
        added = await self._sign(qid, head, body, now) if origin else b""
        if seal:
            added = await self.signing.run(self._seal, qid, head, body, now) + added
        return envelope, added + header

    def _fields_in_thread(
        self, writer: MessageWriter, header: bytes, origin: bool, seal: bool
    ) -> bytes:
        head, body = split_message(header + writer.head(writer.size))
        now = int(self._clock())
        added = b""
        if origin and (keys := self.keys_for(from_domain(head))):
            added = sign_message(keys, head, [body], now=now)
            self._log_signed(writer.queue_id, keys)
        if seal:
            added = self._seal(writer.queue_id, head, body, now) + added
        return added

    async def _sign(self, qid: str, head: bytes, body: bytes, now: int) -> bytes:
        """DKIM-Signature fields; the key operations in the signing thread, or in the helper
        process when there is one."""
        fields = parse_fields(head)
        keys = self.keys_for(from_domain_of(fields))
        if not keys:
            return b""
        names = select_headers(fields)
        body_hash = hash_body([body])
        signed = header_hash_input(fields, names)  # the same for every key
        requests = [
            signature_request(k, fields, body_hash, names, now=now, signed_headers=signed)
            for k in keys
        ]
        if self.helper is None:
            datas = [data for _, data in requests]
            signatures = await self.signing.run(sign_all, keys, datas)
        else:
            signatures = await asyncio.gather(
                *(self.helper.sign(k, data) for k, (_, data) in zip(keys, requests, strict=True))
            )
        added = b"".join(
            finish_field("DKIM-Signature", prefix, sig)
            for (prefix, _), sig in zip(requests, signatures, strict=True)
        )
        self._log_signed(qid, keys)
        return added

    def _seal(self, qid: str, head: bytes, body: bytes, now: int) -> bytes:
        assert self.arc_key is not None
        sealed = arc.seal(self.arc_key, head, [body], server_id=self._server_id, now=now)
        if sealed is None:
            return b""
        log.info("%s: ARC set added (s=%s, d=%s)", qid, self.arc_key.selector, self.arc_key.domain)
        return sealed

    @staticmethod
    def _log_signed(qid: str, keys: Sequence[SigningKey]) -> None:
        for key in keys:
            log.info("%s: DKIM-Signature field added (s=%s, d=%s)", qid, key.selector, key.domain)

    async def close(self) -> None:
        self.signing.close()
        if self.helper is not None:
            await self.helper.close()
