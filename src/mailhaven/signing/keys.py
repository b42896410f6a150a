"""DKIM keys on disk: generate, load, and render the DNS record a domain must publish.

Layout (one file per selector, like OpenDKIM's KeyTable but found by name):
`<key_dir>/<domain>/<selector>.key`, a PEM private key, RSA (RFC 6376 §3.3.3: 2048 bits, the
size every large receiver expects) or Ed25519 (RFC 8463). The algorithm is read from the key;
nothing else is stored, so `mailhaven dkim keygen` and a key copied from OpenDKIM
(`opendkim-genkey` writes PEM too: rename `default.private` to `default.key`) both work.

In: the key directory. Out: `SigningKey` values and TXT record text. Invariants: a key file is
created with mode 0600 (`O_EXCL`, never overwritten); a domain's keys load in selector order,
so which signature comes first is stable.

SECURITY: private keys. The files must be readable by the account the daemon runs as and by no
one else; loading refuses keys that others can read or write (as OpenSSH does), so a key copied
with the wrong mode is reported at start-up, not used.
"""

from __future__ import annotations

import base64
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailhaven.config import DKIM_SELECTOR

Algorithm = Literal["rsa", "ed25519"]
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

#: RFC 8301 §3.2: at least 1024 bits, 2048 recommended (and what Gmail and others expect).
RSA_BITS = 2048
#: Less than this is refused when loading (RFC 8301 §3.2: verifiers MUST NOT accept less).
RSA_MIN_BITS = 1024
KEY_SUFFIX = ".key"
#: A selector is a sequence of DNS labels (RFC 6376 §3.1); we allow the usual LDH labels.
SELECTOR = DKIM_SELECTOR
#: A TXT record's character-strings hold at most 255 octets each (RFC 1035 §3.3).
TXT_STRING_MAX = 255


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the file and why."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    domain: str
    selector: str
    key: PrivateKey
    path: Path

    @property
    def algorithm(self) -> Algorithm:
        return "rsa" if isinstance(self.key, rsa.RSAPrivateKey) else "ed25519"

    @property
    def dkim_algorithm(self) -> str:
        """The `a=` tag value (RFC 6376 §3.5, RFC 8463 §3)."""
        return "rsa-sha256" if self.algorithm == "rsa" else "ed25519-sha256"

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def public_value(self) -> str:
        """The base64 `p=` value: SubjectPublicKeyInfo DER for RSA (RFC 6376 §3.6.1), the raw
        32-octet key for Ed25519 (RFC 8463 §4)."""
        public = self.key.public_key()
        if isinstance(public, ed25519.Ed25519PublicKey):
            raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        else:
            raw = public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        return base64.b64encode(raw).decode("ascii")

    def txt_value(self) -> str:
        return f"v=DKIM1; k={self.algorithm}; p={self.public_value()}"

    def zone_line(self, ttl: int = 3600) -> str:
        """The record as a zone-file line, the value split into <= 255-octet strings."""
        value = self.txt_value()
        parts = [value[i : i + TXT_STRING_MAX] for i in range(0, len(value), TXT_STRING_MAX)]
        quoted = " ".join(f'"{p}"' for p in parts)
        return f"{self.record_name}. {ttl} IN TXT ( {quoted} )"


def key_path(key_dir: Path, domain: str, selector: str) -> Path:
    return key_dir / domain.lower() / f"{selector}{KEY_SUFFIX}"


def generate(key_dir: Path, domain: str, selector: str, algorithm: Algorithm) -> SigningKey:
    """A new key written with mode 0600; FileExistsError when the selector has one already
    (a published selector's key is never replaced: rotation adds a selector)."""
    if not SELECTOR.fullmatch(selector):
        raise KeyFileError(f"selector {selector!r}: letters, digits, hyphens and dots only")
    key: PrivateKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        if algorithm == "rsa"
        else ed25519.Ed25519PrivateKey.generate()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = key_path(key_dir, domain, selector)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    return SigningKey(domain.lower(), selector, key, path)


def load_key(path: Path, domain: str) -> SigningKey:
    """One key file; `KeyFileError` says why it cannot be used."""
    try:
        info = path.stat()
        data = path.read_bytes()
    except OSError as err:
        raise KeyFileError(f"{path}: cannot read: {err.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"{path}: readable or writable by others (mode {info.st_mode & 0o777:o}): "
                        "chmod 600 it")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key: {err}") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < RSA_MIN_BITS:
            raise KeyFileError(f"{path}: RSA key of {key.key_size} bits: at least {RSA_MIN_BITS}")
    elif not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyFileError(f"{path}: neither an RSA nor an Ed25519 key")
    return SigningKey(domain.lower(), path.name.removesuffix(KEY_SUFFIX), key, path)


def domain_keys(key_dir: Path, domain: str, selectors: Iterable[str] | None = None) -> list[SigningKey]:
    """The domain's keys: the named selectors (each must exist), or every `*.key` file."""
    folder = key_dir / domain.lower()
    if selectors is not None:
        return [load_key(key_path(key_dir, domain, s), domain) for s in selectors]
    if not folder.is_dir():
        return []
    return [load_key(p, domain) for p in sorted(folder.glob("*" + KEY_SUFFIX))]


def load_all(key_dir: Path, selectors: dict[str, tuple[str, ...]]) -> dict[str, list[SigningKey]]:
    """Every domain's keys: each sub-directory of `key_dir` is a domain; `selectors` limits a
    domain to the listed selectors (rotation: a new key can wait until its record is out)."""
    found: dict[str, list[SigningKey]] = {}
    names = {d.lower() for d in selectors}
    if key_dir.is_dir():
        names |= {p.name.lower() for p in key_dir.iterdir() if p.is_dir()}
    for domain in sorted(names):
        chosen = next((v for k, v in selectors.items() if k.lower() == domain), None)
        keys = domain_keys(key_dir, domain, chosen)
        if keys:
            found[domain] = keys
    return found


def parse_record(text: str) -> dict[str, str]:
    """Tags of a DKIM key record (RFC 6376 §3.6.1), whitespace removed from values."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags.setdefault(name.strip(), re.sub(r"\s+", "", value))
    return tags
