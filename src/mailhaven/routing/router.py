"""Recipient routing: is this RCPT welcome, what does it expand to, and where does it go.

Role: the pure policy between receive and delivery, in Postfix's terms `mydestination` +
local(8) aliases + `relay_domains` + `mynetworks` + transport(5) + `relayhost`. Three questions:

* `check_recipient(addr, client_ip=, authenticated=)`: None (accept) or the `Reply` to refuse
  the RCPT with. Asked by smtpd at RCPT time.
* `expand(addr)`: the final addresses after alias expansion. Asked by intake or the scheduler.
  An SRS address of ours (a bounce to a sender we rewrote) is accepted and expands to the
  sender it stands for, through the injected `reverse_srs` (`routing.srs`).
* `route(addr)`: the `Route` of one final address. Asked by the scheduler to group recipients.

No I/O, no clock: everything comes in as plain values at construction; the current set of local
users is a callable so a reload is seen without rebuilding the router.

Rules and choices (Postfix behaviour unless said otherwise):

* Domains compare case-insensitively, without a trailing dot, internationalised domains as IDNA
  A-labels (so `bücher.example` and `xn--bcher-kva.example` are one domain). Local parts of
  *local* addresses are case-insensitive (users and alias keys are lower-case); local parts of
  remote addresses are left exactly as given (RFC 5321 §2.4).
* `postmaster` at any local domain, and bare `postmaster`, are always accepted, in any case
  (RFC 5321 §4.5.1). Give it an alias or a user, else a catch-all, else delivery bounces it.
* Relaying (a non-local destination) is allowed for trusted networks, authenticated clients,
  and destinations in `relay_domains` or `held_domains` (we are their backup/store-and-forward
  host, so the world may send to them). A `relay_domains` / `held_domains` / `transport_map`
  entry `.example.com` also matches every subdomain of example.com.
* Source routes `@a,@b:user@c` are reduced to `user@c` (RFC 5321 §4.1.2 and App. C allow it);
  the route is never used to pick a next hop or to grant relaying.
* A transport-map entry `lmtp:unix:/path` or `lmtp:[host]:port` routes its domain to the
  `lmtp` transport, for a local domain too (its recipients are still checked against our
  users and aliases at RCPT time, then handed to the LMTP store, e.g. Dovecot, for delivery).
* Routing syntax inside a local part, i.e. `@`, `%` or `!` (`user%remote@here`,
  `"user@remote"@here`, `remote!user@here`, `user@remote@here`), is never honoured: no percent
  hack, no bang paths. At a local domain such an address is refused with `554 5.7.1 Relay access
  denied` when the client may not relay (Postfix's `allow_untrusted_routing = no`: an open-relay
  probe gets a clear no), and with `550 5.1.1 User unknown` when it may (there is no such user,
  and we do not rewrite it into a relay). It never reaches the catch-all.
* Aliases: keys are `localpart` (every local domain) or `localpart@domain`; for an address
  `user+ext@dom` the lookups are `user+ext@dom`, `user@dom`, `user+ext`, `user` (Postfix
  virtual(5) order). A target that is a bare name stays in the domain being expanded; local
  final addresses keep their domain and extension (so Delivered-To says what was addressed) and
  are de-duplicated per mailbox, so one message reaches a user once. A target that occurs again
  on its own expansion path is a mailbox, not an alias (so `bob: bob, archive` keeps a copy);
  deeper than `MAX_ALIAS_DEPTH` the address is likewise taken as final. An unknown local user
  goes to the catch-all user if there is one, otherwise it stays as it is and the local agent
  bounces it (the users may have changed since RCPT time).
* Virtual domains: a mailbox is a full address (`alice@a.example`); `alice@b.example` is
  another user (or none). A bare name among the mailboxes (`local_users` such as
  `postmaster`) is a mailbox at every local domain. The local route's next hop is the mailbox,
  `user@domain`. An alias key `@domain` is that domain's catch-all (Postfix virtual(5)),
  looked at after its users and aliases; `catch_all` is the fallback for every local domain
  (a bare name: that user at the addressed domain if it has one, else at the primary domain).
* `parked_domains`: domains that were local and are not any more (removed from the
  configuration while mail for them was queued). They route to `hold` (kept in the queue and
  logged, released with ETRN or when the domain comes back), and RCPT for them is not taken.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import idna

from mailhaven.net.ipaddr import client_ip as parse_client_ip
from mailhaven.proto.replies import BAD_RECIPIENT_SYNTAX, Reply, relay_denied, user_unknown
from mailhaven.routing.route import Route, transport_route

#: Alias chains longer than this are cut (sendmail uses 10, Postfix's
#: virtual_alias_recursion_limit 1000; 20 is far beyond any real chain).
MAX_ALIAS_DEPTH = 20
#: At most this many final addresses from one expansion (Postfix virtual_alias_expansion_limit).
MAX_EXPANSION = 1000
#: RFC 5321 §4.5.1: every domain has it, and the bare name must be accepted too.
POSTMASTER = "postmaster"
#: Characters that make a local part a route to somewhere else (RFC 1123 §5.2.16, RFC 976).
ROUTING_CHARS = frozenset("@%!")
_BAD_DOMAIN_CHARS = frozenset('"\\@<>()[],;: \t')

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Address:
    """A recipient split for routing."""

    #: The local part as written (quotes kept), source route removed.
    local: str
    #: The local part with quoting undone: what routing-syntax checks look at.
    mailbox: str
    #: Normalised domain (see module doc); None for a bare local part such as `postmaster`.
    domain: str | None
    #: The local part contains `@`, `%` or `!`.
    routed: bool

    def __str__(self) -> str:
        return self.local if self.domain is None else f"{self.local}@{self.domain}"


def parse_address(text: str) -> Address | None:
    """Split an envelope address; None when it cannot be routed at all."""
    text = text.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if text.startswith("@"):  # source route @a,@b:user@c (RFC 5321 §4.1.2)
        _, colon, text = text.partition(":")
        if not colon:
            return None
    local, at, raw_domain = text.rpartition("@")
    if not at:
        local, raw_domain = text, ""
    if not local:
        return None
    domain: str | None = None
    if at:
        domain = normalise_domain(raw_domain)
        if domain is None:
            return None
    mailbox = local
    if len(local) >= 2 and local[0] == local[-1] == '"':
        mailbox = _unquote(local[1:-1])
    return Address(local, mailbox, domain, any(ch in ROUTING_CHARS for ch in mailbox))


#: LDH labels only: already an A-label form, no IDNA work needed.
_PLAIN_DOMAIN = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")


#: client addresses whose trust is remembered (see `Router._is_trusted`)
_TRUSTED_CACHE_SIZE = 4096


@functools.lru_cache(maxsize=4096)
def normalise_domain(domain: str) -> str | None:
    """Lower-case IDNA A-label form without trailing dot; `[literal]`s canonical; None if bad.

    Cached: IDNA encoding costs tens of microseconds and the same few domains recur in every
    transaction (it is a pure function of its argument)."""
    if domain.isascii():
        plain = domain.strip().rstrip(".").lower()
        if plain and _PLAIN_DOMAIN.fullmatch(plain):
            return plain
    domain = domain.strip().rstrip(".")
    if domain.startswith("[") and domain.endswith("]"):
        inner = domain[1:-1]
        try:
            if inner[:5].lower() == "ipv6:":
                return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
            return f"[{ipaddress.IPv4Address(inner)}]"
        except ValueError:
            return None
    if not domain or any(ch in _BAD_DOMAIN_CHARS or ord(ch) < 32 for ch in domain):
        return None
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return domain.lower()  # e.g. underscores: not IDNA-valid, still a name to match


def _unquote(inner: str) -> str:
    out, escaped = [], False
    for ch in inner:
        if escaped or ch != "\\":
            out.append(ch)
            escaped = False
        else:
            escaped = True
    return "".join(out)


def _literal_ip(domain: str) -> IPAddress | None:
    if not domain.startswith("["):
        return None
    inner = domain[1:-1]
    return ipaddress.ip_address(inner[5:] if inner.startswith("IPv6:") else inner)


def _matches(domain: str, entries: Collection[str]) -> bool:
    """`domain` is an entry, or a subdomain of a `.parent` entry."""
    return domain in entries or any(p in entries for p in _parents(domain))


def _parents(domain: str) -> list[str]:
    """`a.b.c` -> [`.b.c`, `.c`]: the wildcard entries that cover it; none for literals."""
    if domain.startswith("["):
        return []
    labels = domain.split(".")
    return ["." + ".".join(labels[i:]) for i in range(1, len(labels))]


class Router:
    """Routing policy built from plain values; see the module docstring for the rules."""

    def __init__(
        self,
        *,
        local_domains: Iterable[str],
        mailboxes: Callable[[], Collection[str]],
        aliases: Mapping[str, Sequence[str]] | None = None,
        catch_all: str | None = None,
        recipient_delimiter: str = "",
        trusted_networks: Iterable[IPNetwork | str] = (),
        relay_domains: Iterable[str] = (),
        held_domains: Collection[str] = (),
        transport_map: Mapping[str, str] | None = None,
        relayhost: str | None = None,
        local_addresses: Iterable[str] = (),
        reverse_srs: Callable[[str], str | None] | None = None,
        parked_domains: Iterable[str] = (),
    ) -> None:
        #: SRS (routing.srs): a valid rewritten sender of ours -> where its bounce goes
        self._reverse_srs = reverse_srs
        self._local_domains = tuple(dict.fromkeys(_norm_entries(local_domains)))
        self._local_set = frozenset(self._local_domains)
        self._mailboxes = mailboxes
        self._aliases = {_norm_alias_key(k): tuple(v) for k, v in (aliases or {}).items()}
        self._catch_all = catch_all.lower() if catch_all else None
        self._delimiters = frozenset(recipient_delimiter)
        self._trusted = tuple(
            ipaddress.ip_network(n, strict=False) if isinstance(n, str) else n
            for n in trusted_networks
        )
        #: the answer per client address (parsing it showed in profiles: once per message)
        self._trusted_cache: dict[str, bool] = {}
        self._relay_domains = frozenset(_norm_entries(relay_domains))
        self._held_domains = frozenset(_norm_entries(held_domains))
        self._transports = {
            e: hop for k, hop in (transport_map or {}).items() for e in _norm_entries([k])
        }
        self._relayhost = relayhost or None
        self._local_ips = frozenset(ipaddress.ip_address(a) for a in local_addresses)
        self._parked = frozenset(_norm_entries(parked_domains)) - self._local_set

    # --- the three questions ----------------------------------------------------------------

    def check_recipient(self, address: str, *, client_ip: str, authenticated: bool) -> Reply | None:
        """None to accept the RCPT, else the reply refusing it."""
        addr = parse_address(address)
        if addr is None:
            return BAD_RECIPIENT_SYNTAX
        may_relay = authenticated or self._is_trusted(client_ip)
        if self._is_local_address(addr):
            if addr.routed:
                return user_unknown(address) if may_relay else relay_denied(address)
            if self._known_local(addr.mailbox.lower(), addr.domain) or self._srs_origin(addr):
                return None
            return user_unknown(address)
        assert addr.domain is not None  # bare addresses are local
        if may_relay or self._may_receive_for(addr.domain):
            return None
        return relay_denied(address)

    def expand(self, address: str) -> list[str]:
        """Final addresses for one accepted recipient, de-duplicated, in first-seen order."""
        addr = parse_address(address)
        if addr is None:
            return [address]
        if not self._is_local_address(addr):
            return [str(addr)]
        if (origin := self._srs_origin(addr)) is not None:
            return [origin]
        out: dict[str, str] = {}
        self._expand_local(addr, frozenset(), set(), out)
        return list(out.values())

    def route(self, address: str) -> Route:
        """The route of one final address (output of `expand`).

        An address that cannot be parsed routes to the local mailbox "", which the local agent
        refuses permanently: it cannot have been accepted, so something upstream is wrong.
        """
        addr = parse_address(address)
        if addr is None:
            return Route("local", "")
        if self._is_local_address(addr):
            lmtp = self._lmtp_route(addr.domain or self._primary)
            if lmtp is not None:  # a local domain whose store is an LMTP server (Dovecot)
                return lmtp
            lp, dom = addr.mailbox.lower(), self._mail_domain(addr.domain)
            return Route("local", self._user_for(lp, dom) or f"{self._base(lp)}@{dom}")
        domain = addr.domain
        assert domain is not None  # bare addresses are local
        if domain in self._parked or _matches(domain, self._held_domains):
            return Route("hold", domain)
        for entry in (domain, *_parents(domain)):
            if entry in self._transports:
                return transport_route(self._transports[entry])
        if self._relayhost:
            return Route("relay", self._relayhost)
        return Route("relay", domain)

    def _lmtp_route(self, domain: str) -> Route | None:
        for entry in (domain, *_parents(domain)):
            hop = self._transports.get(entry)
            if hop is not None:
                found = transport_route(hop)
                return found if found.transport == "lmtp" else None
        return None

    # --- facts --------------------------------------------------------------------------------

    @property
    def local_domains(self) -> tuple[str, ...]:
        """Normalised local domains, configured order (the first is the primary)."""
        return self._local_domains

    def is_local_domain(self, domain: str) -> bool:
        norm = normalise_domain(domain)
        return norm is not None and self._is_local_norm(norm)

    # --- internals ----------------------------------------------------------------------------

    def _srs_origin(self, addr: Address) -> str | None:
        """A bounce to a sender we rewrote goes back to the original (checked hash and age)."""
        if self._reverse_srs is None or addr.domain is None or addr.routed:
            return None
        if addr.mailbox[:4].upper() not in ("SRS0", "SRS1"):
            return None
        return self._reverse_srs(f"{addr.mailbox}@{addr.domain}")

    def _is_local_norm(self, domain: str) -> bool:
        if domain in self._local_set:
            return True
        ip = _literal_ip(domain)
        return ip is not None and ip in self._local_ips

    def _is_local_address(self, addr: Address) -> bool:
        return addr.domain is None or self._is_local_norm(addr.domain)

    def _is_trusted(self, client_ip: str) -> bool:
        known = self._trusted_cache.get(client_ip)
        if known is not None:
            return known
        ip = parse_client_ip(client_ip)
        trusted = ip is not None and any(ip in net for net in self._trusted)
        if len(self._trusted_cache) >= _TRUSTED_CACHE_SIZE:
            self._trusted_cache.clear()  # bounded: many distinct clients just start over
        self._trusted_cache[client_ip] = trusted
        return trusted

    def _may_receive_for(self, domain: str) -> bool:
        return _matches(domain, self._relay_domains) or _matches(domain, self._held_domains)

    def _base(self, local: str) -> str:
        """`user+ext` -> `user` (the first delimiter character after position 0 cuts)."""
        for i, ch in enumerate(local):
            if i and ch in self._delimiters:
                return local[:i]
        return local

    def _user_for(self, local: str, domain: str) -> str | None:
        """The mailbox (`user@domain`) that `local@domain` or its base name is, if any."""
        users = self._mailboxes()
        for name in dict.fromkeys((local, self._base(local))):
            if f"{name}@{domain}" in users or name in users:
                return f"{name}@{domain}"
        return None

    def _catch_all_for(self, domain: str) -> str | None:
        """The `catch_all` mailbox for an unknown user at `domain` (see the module doc)."""
        if not self._catch_all:
            return None
        name, _, at = self._catch_all.partition("@")
        if at:
            return self._user_for(name, normalise_domain(at) or at) or self._catch_all
        return (
            self._user_for(name, domain)
            or self._user_for(name, self._primary)
            or f"{name}@{domain}"
        )

    def _alias_targets(self, local: str, domain: str) -> tuple[str, ...] | None:
        base = self._base(local)
        for key in (f"{local}@{domain}", f"{base}@{domain}", local, base):
            if key in self._aliases:
                return self._aliases[key]
        return None

    def _known_local(self, local: str, domain: str | None) -> bool:
        domain = self._mail_domain(domain)
        if local == POSTMASTER or self._catch_all or self._user_for(local, domain):
            return True
        if f"@{domain}" in self._aliases:
            return True
        return self._alias_targets(local, domain) is not None

    @property
    def _primary(self) -> str:
        return self._local_domains[0] if self._local_domains else "localhost"

    def _mail_domain(self, domain: str | None) -> str:
        """The domain whose users a local address reaches: its own, or for a bare name or an
        address literal of ours (`alice@[192.0.2.1]`) the primary one."""
        return domain if domain is not None and domain in self._local_set else self._primary

    def _expand_local(
        self, addr: Address, path: frozenset[str], done: set[str], out: dict[str, str]
    ) -> None:
        """Depth-first alias expansion of one local address into `out` (mailbox -> address)."""
        local, domain = addr.mailbox.lower(), self._mail_domain(addr.domain)
        key = f"{local}@{domain}"
        if len(out) >= MAX_EXPANSION:
            return
        targets = None
        if not addr.routed and key not in path and len(path) < MAX_ALIAS_DEPTH:
            if key in done:  # already expanded elsewhere in this tree: nothing new below
                return
            targets = self._alias_targets(local, domain)
        if targets is None:  # a mailbox: not aliased, a self-reference, or too deep
            user = self._user_for(local, domain)
            if user is None and not addr.routed:
                domain_catch_all = self._aliases.get(f"@{domain}")
                if domain_catch_all is not None and f"@{domain}" not in path:
                    targets, key = domain_catch_all, f"@{domain}"
                elif (user := self._catch_all_for(domain)) is not None:
                    key = user
            if targets is None:
                out.setdefault("local:" + (user or f"{local}@{domain}"), key)
                return
        for target in targets:
            t = parse_address(target if "@" in target else f"{target}@{domain}")
            if t is None:
                continue
            if self._is_local_address(t):
                self._expand_local(t, path | {key}, done, out)
            elif len(out) < MAX_EXPANSION:
                out.setdefault("remote:" + str(t), str(t))
        done.add(key)


def _norm_entries(domains: Iterable[str]) -> list[str]:
    """Normalise configured domains, keeping a leading `.` (subdomain wildcard)."""
    out = []
    for d in domains:
        dot = "." if d.startswith(".") else ""
        norm = normalise_domain(d.lstrip("."))
        if norm is not None:
            out.append(dot + norm)
    return out


def _norm_alias_key(key: str) -> str:
    local, at, domain = key.strip().rpartition("@")
    if not at:
        return key.strip().lower()
    return f"{local.lower()}@{normalise_domain(domain) or domain.lower()}"
