"""Mailbox names and where their Maildirs live: `<mail_root>/<domain>/<user>/`.

Role: the one place that turns a mailbox name into a path and a login name into a mailbox name.
A mailbox is a full address, `alice@a.example` (lower case, the domain as IDNA A-labels); each
local domain has its own users. The layout is Dovecot's `mail_location =
maildir:<mail_root>/%Ld/%Ln`, so Dovecot IMAP serves the same Maildirs without a per-user table.

In: names from routing, the users file or a client's login. Out: canonical names
(`canonical_name`) and paths (`mailbox_path`); `None`/`ValueError` for anything else.

Invariants: a canonical name is `local@domain` where `local` is an RFC 5322 dot-atom (lower
case, without `/`, `%` or `!`, at most 64 octets, RFC 5321 §4.5.3.1.1) and `domain` is LDH labels of at
most 63 octets, at most 255 in all (RFC 1035 §2.3.4). So neither part can be empty, contain `/`,
NUL or `..`, or start with a dot: a name can never leave its domain's directory, name a Maildir
sub-directory (`new`, `cur`, `tmp` are valid users, and live one level below them) or a
Maildir++ folder (those start with a dot).

SECURITY: everything here is applied to untrusted input (logins over the network) before it
names a file; it is pure (no I/O).
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import idna

#: RFC 5321 §4.5.3.1.1: a local part is at most 64 octets.
MAX_LOCAL = 64
#: RFC 1035 §2.3.4: a label is at most 63 octets, a name at most 255.
MAX_LABEL = 63
MAX_DOMAIN = 255
#: RFC 5321 §4.5.3.1.3: a path is at most 256 octets; no login can be longer than an address.
MAX_ADDRESS = 256

#: RFC 5322 atext, lower case, without "/" and without the routing characters "%" and "!"
#: (RFC 1123 §5.2.16), which routing never lets reach a mailbox either
_ATEXT = r"[a-z0-9#$&'*+=?^_`{|}~-]+"
LOCAL = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?")  # LDH, and "_" as routing allows


def normalize_domain(text: str) -> str | None:
    """A domain in the form mailbox names use (lower case A-labels, no trailing dot), or None."""
    text = unicodedata.normalize("NFKC", text).strip().lower().removesuffix(".")
    if not text or len(text) > MAX_DOMAIN:
        return None
    if not text.isascii():
        try:
            text = idna.encode(text, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            return None
    labels = text.split(".")
    if any(len(label) > MAX_LABEL or not _LABEL.fullmatch(label) for label in labels):
        return None
    return text


def normalize_local(text: str) -> str | None:
    """A local part in canonical form (NFKC, lower case), or None when it cannot name a user."""
    local = unicodedata.normalize("NFKC", text).lower()
    if len(local.encode("utf-8")) > MAX_LOCAL or not LOCAL.fullmatch(local):
        return None
    return local


def canonical_name(text: str) -> str | None:
    """`Alice@A.Example` -> `alice@a.example`; a bare `Alice` -> `alice`; None when invalid.

    Logins, the users file, the failed-login limiter and routing all use this one form, so
    look-alike spellings of a name can neither dodge its failure count nor open another entry.
    """
    if len(text) > MAX_ADDRESS or "\0" in text:
        return None
    local, at, domain = text.strip().rpartition("@")
    if not at:
        return normalize_local(domain)
    if domain != domain.strip():  # white space inside the name is not outer white space
        return None
    norm_local, norm_domain = normalize_local(local), normalize_domain(domain)
    if norm_local is None or norm_domain is None:
        return None
    return f"{norm_local}@{norm_domain}"


def split_name(name: str) -> tuple[str, str | None]:
    """`alice@a.example` -> ("alice", "a.example"); a bare name -> (name, None)."""
    local, at, domain = name.rpartition("@")
    return (local, domain) if at else (domain, None)


def mailbox_path(mail_root: Path, user: str) -> Path:
    """`<mail_root>/<domain>/<local>` for a canonical full address; ValueError for anything
    else (a bare name, upper case, a path separator): routing and logins hand over canonical
    names, so anything else here is a bug or an attack, and must not become a path."""
    if canonical_name(user) != user or "@" not in user:
        raise ValueError(f"not a valid mailbox name: {user[:80]!r}")
    local, domain = split_name(user)
    assert domain is not None
    return mail_root / domain / local
