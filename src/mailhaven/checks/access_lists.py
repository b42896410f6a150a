"""Allow and block lists for client networks, senders and recipients (`[checks.access]`).

In: the lists from the configuration, then per question a client address, or an envelope
address. Out: `BLOCK`, `ALLOW` or None (no entry matches). Pure and synchronous: the lists are
parsed once, when the configuration is loaded, so each question costs a few set lookups.

Entry forms (Postfix access(5) spirit):
- clients: an address or a network in CIDR notation (`192.0.2.7`, `198.51.100.0/24`, `2001:db8::/32`);
- senders and recipients: a whole address (`user@example.org`), a domain (`example.org` or
  `@example.org`), a domain and its subdomains (`.example.org`), a local part in any domain
  (`user@`), or `<>` for the null sender.

Block wins over allow: a blocked sender stays blocked even from an allowed network. Lookups are
case-insensitive, and an address with a recipient delimiter is looked up as written (the lists
are the operator's, who can list both forms).

SECURITY: the addresses come from the client; they are only compared, never interpreted.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from mailhaven.net.ipaddr import IPAddress, client_ip

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Verdict(enum.Enum):
    ALLOW = "allow"
    BLOCK = "block"


BLOCK = Verdict.BLOCK
ALLOW = Verdict.ALLOW


def parse_network(text: str) -> IPNetwork:
    """`text` as a network (a bare address is its own /32 or /128); ValueError when bad."""
    return ipaddress.ip_network(text.strip(), strict=False)




def in_networks(address: str | IPAddress | None, networks: Sequence[IPNetwork]) -> bool:
    """Is `address` (text, or parsed once by `net.ipaddr.client_ip`) in one of `networks`?"""
    if not networks:  # the usual case: no parsing at all
        return False
    ip = client_ip(address) if isinstance(address, str) else address
    return ip is not None and any(ip.version == n.version and ip in n for n in networks)


@dataclass(frozen=True)
class AddressList:
    """One list of sender or recipient patterns (see the module docstring for the forms)."""

    addresses: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()
    parents: tuple[str, ...] = ()  # ".example.org" entries, stored with their dot
    locals: frozenset[str] = frozenset()
    null: bool = False

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AddressList:
        addresses, domains, parents, locals_, null = set(), set(), [], set(), False
        for raw in entries:
            entry = raw.strip().lower()
            if entry in ("<>", ""):
                null = null or entry == "<>"
            elif entry.startswith("."):
                parents.append(entry)
            elif entry.startswith("@"):
                domains.add(entry[1:])
            elif entry.endswith("@"):
                locals_.add(entry[:-1])
            elif "@" in entry:
                addresses.add(entry)
            else:
                domains.add(entry)
        return cls(frozenset(addresses), frozenset(domains), tuple(parents),
                   frozenset(locals_), null)

    @functools.cached_property
    def empty(self) -> bool:
        return not (self.addresses or self.domains or self.parents or self.locals or self.null)

    def __bool__(self) -> bool:
        return not self.empty

    def matches(self, address: str) -> bool:
        if self.empty:  # the usual case, asked at every RCPT TO
            return False
        if not address:
            return self.null
        text = address.lower()
        local, at, domain = text.rpartition("@")
        if text in self.addresses or (at and local in self.locals):
            return True
        domain = domain.rstrip(".")
        if domain in self.domains:
            return True
        return any(domain.endswith(parent) for parent in self.parents)


def check_entry(entry: str) -> str | None:
    """Why a sender/recipient entry is unusable, or None (for `config` validation)."""
    text = entry.strip()
    if not text:
        return "an empty entry"
    if any(c.isspace() for c in text) or (text.count("@") > 1 and not text.startswith('"')):
        return "not an address, domain or local part"
    return None


@dataclass(frozen=True)
class AccessLists:
    """All six lists; `client`, `sender`, `recipient` answer BLOCK, ALLOW or None."""

    client_allow: tuple[IPNetwork, ...] = ()
    client_block: tuple[IPNetwork, ...] = ()
    sender_allow: AddressList = field(default_factory=AddressList)
    sender_block: AddressList = field(default_factory=AddressList)
    recipient_allow: AddressList = field(default_factory=AddressList)
    recipient_block: AddressList = field(default_factory=AddressList)

    @classmethod
    def build(
        cls,
        *,
        client_allow: Iterable[str] = (),
        client_block: Iterable[str] = (),
        sender_allow: Iterable[str] = (),
        sender_block: Iterable[str] = (),
        recipient_allow: Iterable[str] = (),
        recipient_block: Iterable[str] = (),
    ) -> AccessLists:
        return cls(
            tuple(parse_network(n) for n in client_allow),
            tuple(parse_network(n) for n in client_block),
            AddressList.parse(sender_allow),
            AddressList.parse(sender_block),
            AddressList.parse(recipient_allow),
            AddressList.parse(recipient_block),
        )

    def client(self, address: str | IPAddress | None) -> Verdict | None:
        if in_networks(address, self.client_block):
            return BLOCK
        if in_networks(address, self.client_allow):
            return ALLOW
        return None

    def sender(self, address: str) -> Verdict | None:
        if self.sender_block.matches(address):
            return BLOCK
        if self.sender_allow.matches(address):
            return ALLOW
        return None

    def recipient(self, address: str) -> Verdict | None:
        if self.recipient_block.matches(address):
            return BLOCK
        if self.recipient_allow.matches(address):
            return ALLOW
        return None
