"""Sender Rewriting Scheme, in postsrsd's (libsrs2's) SRS0/SRS1 format.

Role (routing): mail that an alias forwards to another domain leaves with an envelope sender
in our domain, so the next hop's SPF check sees our IP with our domain; a bounce sent back to
that address is recognised here, checked and turned back into the original sender.

Format (libsrs2, `=` separator, a two-character day stamp in base32, the hash the first
`hash_length` base64 characters of HMAC-SHA1(secret, lower-cased parts)):
* `user@example.org` -> `SRS0=HHHH=TT=example.org=user@ourdomain`
* an SRS0 address of another forwarder `SRS0=hhhh=tt=orig=user@fwd.example` ->
  `SRS1=HHHH=fwd.example==hhhh=tt=orig=user@ourdomain` (we vouch only for the hop to them);
  an SRS1 address keeps its original part and gets our hash.
Reversal of SRS1 gives the previous forwarder's SRS0 address, of SRS0 the original sender.
Addresses made by postsrsd with the same secret reverse here, and ours there.

Pure: secrets and time come in as values. The relayed copies get the rewritten sender from
`mailhaven.delivery.forwarded`. SECURITY: the hash is what stops us from being an
open relay (anyone could write `SRS0=...=victim.example=x@ourdomain`), so reversal checks it
with every configured secret (the first one signs: rotation adds a new first line) and checks
the time stamp against `max_age` days (libsrs2's default, 21).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence

#: The envelope `extra` key holding the sender relayed copies use (set by intake's hook).
SRS_SENDER = "srs_sender"
#: libsrs2's timestamp: days, two base32 characters, so it wraps every 1024 days.
_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
DAY = 86400
TIME_SLOTS = 1024
#: libsrs2 defaults (postsrsd's too).
DEFAULT_MAX_AGE = 21
DEFAULT_HASH_LENGTH = 4
#: libsrs2 accepts these as the character after SRS0/SRS1.
SEPARATORS = "=-+"


def timestamp(now: float) -> str:
    day = int(now) // DAY
    return _BASE32[(day >> 5) & 31] + _BASE32[day & 31]


def is_srs(local: str) -> bool:
    return len(local) > 5 and local[:4].upper() in ("SRS0", "SRS1") and local[4] in SEPARATORS


class SRS:
    """Forward and reverse with fixed settings; see the module docstring for the format."""

    def __init__(
        self,
        secrets: Sequence[bytes],
        domain: str,
        *,
        max_age: int = DEFAULT_MAX_AGE,
        hash_length: int = DEFAULT_HASH_LENGTH,
        separator: str = "=",
    ) -> None:
        if not secrets or not all(secrets):
            raise ValueError("SRS needs at least one non-empty secret")
        if separator not in SEPARATORS:
            raise ValueError(f"SRS separator: one of {SEPARATORS}")
        self._secrets = tuple(secrets)
        self.domain = domain.lower()
        self._max_age = max_age
        self._hash_length = hash_length
        self._sep = separator

    def _hash(self, secret: bytes, *parts: str) -> str:
        # ASCII-only lower-casing, as libsrs2's tolower() in the C locale (UTF-8 octets stay)
        mac = hmac.new(secret, b"".join(p.encode().lower() for p in parts), hashlib.sha1)
        return base64.b64encode(mac.digest()).decode("ascii")[: self._hash_length]

    def _hash_ok(self, given: str, *parts: str) -> bool:
        if len(given) < self._hash_length:
            return False
        given_octets = given[: self._hash_length].encode().lower()
        return any(
            hmac.compare_digest(given_octets, self._hash(s, *parts).encode().lower())
            for s in self._secrets
        )

    def forward(self, sender: str, now: float) -> str:
        """The rewritten sender; the null sender, one without a domain and one in our own
        SRS domain stay as they are (libsrs2 does not rewrite those)."""
        user, at, host = sender.rpartition("@")
        if not at or not user or host.lower() == self.domain:
            return sender
        sep = self._sep
        if is_srs(user) and user[:4].upper() == "SRS1":
            # SRS1=hash=orighost==rest: keep the original forwarder's part, rehash it
            body = user[5:]
            _old_hash, _, rest = body.partition("=")
            orig_host, _, orig_user = rest.partition("=")
            if orig_host and orig_user:
                h = self._hash(self._secrets[0], orig_host, orig_user)
                return f"SRS1{sep}{h}={orig_host}={orig_user}@{self.domain}"
        if is_srs(user) and user[:4].upper() == "SRS0":
            orig_user = user[4:]  # keeps its separator: SRS1=HHHH=host==hhhh=tt=...
            h = self._hash(self._secrets[0], host, orig_user)
            return f"SRS1{sep}{h}={host}={orig_user}@{self.domain}"
        stamp = timestamp(now)
        h = self._hash(self._secrets[0], stamp, host, user)
        return f"SRS0{sep}{h}={stamp}={host}={user}@{self.domain}"

    def reverse(self, address: str, now: float) -> str | None:
        """The address a bounce to `address` must go to, or None: not SRS, malformed, a bad
        hash or too old. The domain part is not looked at (libsrs2 neither): any of our
        domains may carry it."""
        local = address.rpartition("@")[0] if "@" in address else address
        if not is_srs(local):
            return None
        tag, body = local[:4].upper(), local[5:]
        if tag == "SRS1":
            given, _, rest = body.partition("=")
            host, _, user = rest.partition("=")
            if not (given and host and user) or not self._hash_ok(given, host, user):
                return None
            return f"SRS0{user}@{host}"
        parts = body.split("=", 3)
        if len(parts) != 4 or not all(parts):
            return None
        given, stamp, host, user = parts
        if not self._fresh(stamp, now) or not self._hash_ok(given, stamp, host, user):
            return None
        return f"{user}@{host}"

    def _fresh(self, stamp: str, now: float) -> bool:
        if len(stamp) != 2:
            return False
        then = 0
        for ch in stamp.upper():
            pos = _BASE32.find(ch)
            if pos < 0:
                return False
            then = (then << 5) | pos
        today = (int(now) // DAY) % TIME_SLOTS
        while today < then:
            today += TIME_SLOTS
        return today <= then + self._max_age


def load_secrets(text: str) -> list[bytes]:
    """postsrsd's secrets file: one secret a line, the first signs; blank lines ignored."""
    return [line.strip().encode() for line in text.splitlines() if line.strip()]

