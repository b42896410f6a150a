"""DNS for mail: MX lookup (RFC 5321 §5.1), null MX (RFC 7505), A/AAAA; cached lookups of any
type for the mail-authentication checks (`Resolver.lookup`); over dnspython.

In: a destination domain (or a domain literal). Out: values, never exceptions, because every
outcome is expected: `MXHosts` (sorted by preference, equal preferences shuffled, RFC 5321
§5.1; an implicit MX when the domain has none), `NullMX` (the domain accepts no mail: bounce
with 5.1.10), or `LookupFailed` carrying the `Reply` to record (NXDOMAIN and other definite
answers permanent, SERVFAIL and timeouts temporary). `plan_targets` is the pure step from MX
hosts and their addresses to the ordered, bounded list of hosts to try.

Domain literals (`[192.0.2.1]`, `[IPv6:2001:db8::1]`, RFC 5321 §4.1.3) and bare IP addresses
never touch DNS. With `nameservers` given, the resolver is built with `configure=False`, so no
system configuration (and no real DNS) is ever read: that is how the tests run.

SECURITY: names come from envelope recipients, i.e. from anyone who can send us mail; dnspython
validates labels and IDNA, and every lookup is bounded by `timeout` (the resolver's lifetime).
Answers are not DNSSEC-validated (DANE is out of scope here).

`lookup(name, rdtype)` serves SPF, DKIM, DMARC and ARC: its answer is a value (`Records`,
`NoRecords` with NXDOMAIN told apart from NODATA, as RFC 7208 §4.6.4 void lookups need, or
`DNSError`, always temporary), kept in a `TTLCache` for its TTL (negative answers for the SOA's
negative TTL, RFC 2308 §5), and concurrent identical questions share one query, so a burst of
mail from one domain costs one lookup. Failures are never cached.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import random
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.PTR
import dns.rdtypes.ANY.SOA
import dns.rdtypes.ANY.TXT
import dns.resolver
import dns.reversename

from mailhaven.net.dns_cache import DEFAULT_MAX_ENTRIES, TTLCache
from mailhaven.proto.replies import Reply

#: RFC 5321 §5.1 orders MX hosts; past a handful nobody answers anyway (Postfix: 5 addresses).
DEFAULT_MAX_HOSTS = 5
#: The most MX records we look at, so a hostile zone cannot make us resolve hundreds of names.
MAX_MX_RECORDS = 20
#: EDNS0 payload (DNS flag day 2020): larger answers come over TCP instead of fragmenting.
EDNS_PAYLOAD = 1232
IPFamilies = Literal["all", "ipv4", "ipv6"]
#: How long a negative answer without an SOA (so without a negative TTL, RFC 2308 §5) is kept:
#: short, but long enough that a burst of mail does not ask again for every message.
NEGATIVE_TTL_WITHOUT_SOA = 30


@dataclass(frozen=True, slots=True)
class MXHost:
    preference: int
    host: str  # lower case, no final dot; a domain literal stays in brackets


@dataclass(frozen=True, slots=True)
class MXHosts:
    """Where mail for the domain goes, best first. `implicit`: no MX, the domain itself."""

    hosts: tuple[MXHost, ...]
    implicit: bool = False


@dataclass(frozen=True, slots=True)
class NullMX:
    """RFC 7505: the domain publishes `MX 0 .`, it accepts no mail."""

    domain: str

    @property
    def reply(self) -> Reply:
        return Reply(556, f"Domain {self.domain} does not accept mail (nullMX)", "5.1.10")


@dataclass(frozen=True, slots=True)
class LookupFailed:
    """The lookup gave no usable answer; `reply` says whether that is final."""

    reply: Reply

    @property
    def permanent(self) -> bool:
        return self.reply.is_permanent


@dataclass(frozen=True, slots=True)
class Target:
    """One host to try, with its addresses in the order to try them."""

    host: str
    preference: int
    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PTRNames:
    """The names a reverse zone gives an address (none: NODATA), and the answer's TTL."""

    names: tuple[str, ...]
    ttl: int


MXResult = MXHosts | NullMX | LookupFailed


@dataclass(frozen=True, slots=True)
class Records:
    """A positive answer. `values` in text: A/AAAA addresses, PTR/CNAME/NS names (lower case, no
    final dot), MX exchange names by preference, TXT each record's strings joined without
    separator (RFC 7208 §3.3, RFC 6376 §3.6.2.2) and decoded as Latin-1 (lossless)."""

    values: tuple[str, ...]
    ttl: int


@dataclass(frozen=True, slots=True)
class NoRecords:
    """No such record: `nxdomain` (the name does not exist) or NODATA (it does, without this
    type). A name that is not a valid domain name counts as NXDOMAIN."""

    nxdomain: bool
    ttl: int = 0


@dataclass(frozen=True, slots=True)
class DNSError:
    """No answer: timeout, SERVFAIL or REFUSED from every server. Always temporary."""

    reason: str


DNSAnswer = Records | NoRecords | DNSError


def _failure(name: str, rdtype: str, why: str, *, permanent: bool) -> LookupFailed:
    """Postfix's wording, so logs read the same: dsn 5.4.4 when final, 4.4.3 when not (then
    always "Host not found, try again", whatever the resolver's reason: the details are not
    the sender's business)."""
    text = f"Host or domain name not found. Name service error for name={name} type={rdtype}"
    if permanent:
        return LookupFailed(Reply(550, f"{text}: {why}", "5.4.4"))
    return LookupFailed(Reply(451, f"{text}: Host not found, try again", "4.4.3"))


@functools.lru_cache(maxsize=1024)
def parse_literal(host: str) -> str | None:
    """The IP address in a domain literal or a bare address, else None (RFC 5321 §4.1.3).

    Cached: the relay asks once per delivery, mostly about the same few next hops."""
    text = host
    if host.startswith("[") and host.endswith("]"):
        text = host[1:-1]
        if text[:5].upper() == "IPV6:":
            text = text[5:]
        elif ":" in text:  # an IPv6 literal needs its tag
            return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def sort_mx(records: Sequence[MXHost], rng: random.Random) -> tuple[MXHost, ...]:
    """Lowest preference first; equal preferences in random order (RFC 5321 §5.1)."""
    shuffled = list(records)
    rng.shuffle(shuffled)
    return tuple(sorted(shuffled, key=lambda r: r.preference))  # sorted() is stable


def plan_targets(
    mx: MXHosts,
    addresses: Mapping[str, Sequence[str] | LookupFailed],
    *,
    max_hosts: int = DEFAULT_MAX_HOSTS,
    self_names: Collection[str] = (),
) -> list[Target] | LookupFailed:
    """The hosts to try in order, at most `max_hosts` of those with addresses.

    RFC 5321 §5.1: when we are one of the MX hosts, only hosts more preferred than us are
    candidates (else mail would loop); if none is, that is a permanent 5.4.6. When no host
    has an address, the failure is temporary if any lookup was, permanent otherwise.
    """
    hosts = list(mx.hosts)
    ours = [h.preference for h in hosts if h.host in {n.lower() for n in self_names}]
    if ours:
        hosts = [h for h in hosts if h.preference < min(ours)]
        if not hosts:
            first = mx.hosts[0].host
            return LookupFailed(Reply(554, f"mail for {first} loops back to myself", "5.4.6"))
    targets: list[Target] = []
    failures: list[LookupFailed] = []
    for h in hosts:
        found = addresses.get(h.host, ())
        if isinstance(found, LookupFailed):
            failures.append(found)
        elif found and len(targets) < max_hosts:
            targets.append(Target(h.host, h.preference, tuple(found)))
    if targets:
        return targets
    temporary = [f for f in failures if not f.permanent]
    if temporary or failures:
        return (temporary or failures)[0]
    name = hosts[0].host if hosts else "?"
    return _failure(name, "A", "Host found but no data record of requested type", permanent=True)


class Resolver:
    """The only door to DNS for delivery: a thin facade over `dns.asyncresolver`."""

    def __init__(
        self,
        nameservers: list[tuple[str, int]] | None = None,
        timeout: float = 10.0,
        *,
        families: IPFamilies = "all",
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if nameservers is None:
            self._resolver = dns.asyncresolver.Resolver()  # /etc/resolv.conf
        else:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, port) for host, port in nameservers
            ]
        self._resolver.use_edns(0, 0, EDNS_PAYLOAD)
        self._resolver.lifetime = timeout
        self._resolver.timeout = min(timeout, 2.0)  # per try, so a lost UDP packet is retried
        self.families = families
        self._rng = rng or random.SystemRandom()
        self.cache: TTLCache[tuple[str, str], Records | NoRecords] = TTLCache(
            DEFAULT_MAX_ENTRIES, clock=clock
        )
        self._in_flight: dict[tuple[str, str], asyncio.Future[DNSAnswer]] = {}

    async def resolve_mx(self, domain: str) -> MXResult:
        """MX hosts for `domain`, a null MX, or why there are none (RFC 5321 §5.1, RFC 7505)."""
        domain = domain.lower().rstrip(".")
        if parse_literal(domain) is not None:
            return MXHosts((MXHost(0, domain),), implicit=True)
        if domain.startswith("["):
            return _failure(domain, "MX", "malformed domain literal", permanent=True)
        answer = await self._query(domain, "MX")
        if isinstance(answer, LookupFailed):
            return answer
        if answer is None:  # no MX records: the implicit MX is the domain itself
            return MXHosts((MXHost(0, domain),), implicit=True)
        records = [
            MXHost(r.preference, r.exchange.to_text(omit_final_dot=True).lower())
            for r in list(answer)[:MAX_MX_RECORDS]
            if isinstance(r, dns.rdtypes.ANY.MX.MX)
        ]
        usable = [r for r in records if r.host not in ("", ".")]
        if not usable:  # "0 ." alone (RFC 7505 §3); "." next to real hosts is ignored
            return NullMX(domain)
        return MXHosts(sort_mx(usable, self._rng))

    async def resolve_addresses(self, host: str) -> list[str] | LookupFailed:
        """IPv6 then IPv4 addresses of `host` (as allowed by `families`); [] when it has none."""
        literal = parse_literal(host)
        if literal is not None:
            return [literal]
        if host.startswith("["):
            return _failure(host, "A", "malformed domain literal", permanent=True)
        rdtypes = {"all": ["AAAA", "A"], "ipv4": ["A"], "ipv6": ["AAAA"]}[self.families]
        answers = await asyncio.gather(*(self._query(host, t) for t in rdtypes))
        found = [r.to_text() for a in answers if a is not None and not isinstance(a, LookupFailed)
                 for r in a]  # fmt: skip
        failures = [a for a in answers if isinstance(a, LookupFailed)]
        if found or not failures:
            return found
        temporary = [f for f in failures if not f.permanent]
        return (temporary or failures)[0]

    async def resolve_ptr(self, address: str) -> PTRNames | LookupFailed:
        """The PTR names of `address` (RFC 1035 §3.5, RFC 3596 §2.5), lower case, no final dot."""
        try:
            qname = dns.reversename.from_address(address)
        except (ValueError, dns.exception.SyntaxError):
            return _failure(address, "PTR", "not an IP address", permanent=True)
        answer = await self._query(qname.to_text(), "PTR")
        if isinstance(answer, LookupFailed):
            return answer
        if answer is None:
            return PTRNames((), 0)
        names = tuple(
            r.target.to_text(omit_final_dot=True).lower()
            for r in answer
            if isinstance(r, dns.rdtypes.ANY.PTR.PTR)
        )
        return PTRNames(names, answer.rrset.ttl if answer.rrset is not None else 0)

    async def resolve_targets(
        self, domain: str, *, max_hosts: int = DEFAULT_MAX_HOSTS, self_names: Collection[str] = ()
    ) -> list[Target] | NullMX | LookupFailed:
        """MX lookup, then the addresses of every MX host at once, then `plan_targets`."""
        mx = await self.resolve_mx(domain)
        if not isinstance(mx, MXHosts):
            return mx
        hosts = list(dict.fromkeys(h.host for h in mx.hosts))
        found = await asyncio.gather(*(self.resolve_addresses(h) for h in hosts))
        return plan_targets(
            mx, dict(zip(hosts, found, strict=True)), max_hosts=max_hosts, self_names=self_names
        )

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer | LookupFailed | None:
        """One lookup: the answer, None for "no such record" (NODATA), or a failure."""
        try:
            qname = dns.name.from_text(name)
            return await self._resolver.resolve(qname, rdtype, search=False)
        except dns.resolver.NoAnswer:
            return None
        except dns.resolver.NXDOMAIN:
            return _failure(name, rdtype, "Host not found", permanent=True)
        except dns.exception.Timeout:
            return _failure(name, rdtype, "timeout", permanent=False)
        except dns.resolver.NoNameservers:  # SERVFAIL or REFUSED from every server
            return _failure(name, rdtype, "server failure", permanent=False)
        except (dns.name.NameTooLong, dns.name.LabelTooLong, dns.name.EmptyLabel,
                dns.name.BadEscape, dns.name.IDNAException):  # fmt: skip
            text = f"Name service error for {name}: invalid host or domain name"
            return LookupFailed(Reply(550, text, "5.4.4"))
        except dns.exception.DNSException:
            return _failure(name, rdtype, "resolver error", permanent=False)

    # ------------------------------------------------------------------ cached lookups

    async def lookup(self, name: str, rdtype: str) -> DNSAnswer:
        """The `rdtype` records of `name`, from the cache while their TTL lasts. Concurrent
        calls for the same question wait for one query; a failure reaches all of them and is
        not kept."""
        key = (name.lower().rstrip("."), rdtype.upper())
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        pending = self._in_flight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[DNSAnswer] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            answer = await self._lookup_uncached(*key)
        except BaseException as exc:  # cancelled: the waiters must not hang
            future.set_result(DNSError(f"lookup abandoned: {type(exc).__name__}"))
            raise
        finally:
            del self._in_flight[key]
        if not future.done():
            future.set_result(answer)
        if isinstance(answer, Records | NoRecords):
            self.cache.put(key, answer, answer.ttl)
        return answer

    async def _lookup_uncached(self, name: str, rdtype: str) -> DNSAnswer:
        try:
            qname = dns.name.from_text(name)
            answer = await self._resolver.resolve(qname, rdtype, search=False)
        except dns.resolver.NoAnswer as exc:
            return NoRecords(False, _negative_ttl(exc.kwargs.get("response")))
        except dns.resolver.NXDOMAIN as exc:
            responses = list(exc.kwargs.get("responses", {}).values())
            return NoRecords(True, _negative_ttl(responses[0] if responses else None))
        except dns.exception.Timeout:
            return DNSError("timeout")
        except dns.resolver.NoNameservers:
            return DNSError("server failure")
        except (dns.name.NameTooLong, dns.name.LabelTooLong, dns.name.EmptyLabel,
                dns.name.BadEscape, dns.name.IDNAException, dns.exception.SyntaxError,
                UnicodeError):  # fmt: skip
            return NoRecords(True, 0)  # not a domain name: nothing can be cached for it
        except dns.exception.DNSException as exc:
            return DNSError(f"resolver error: {type(exc).__name__}")
        ttl = answer.rrset.ttl if answer.rrset is not None else 0
        return Records(_texts(answer), ttl)


def _texts(answer: dns.resolver.Answer) -> tuple[str, ...]:
    """The answer's records as `Records.values` (see there)."""
    out: list[tuple[int, str]] = []
    for r in answer:
        if isinstance(r, dns.rdtypes.ANY.TXT.TXT):
            out.append((0, b"".join(r.strings).decode("latin-1")))
        elif isinstance(r, dns.rdtypes.ANY.MX.MX):
            out.append((r.preference, r.exchange.to_text(omit_final_dot=True).lower()))
        elif hasattr(r, "target"):  # PTR, CNAME, NS
            out.append((0, r.target.to_text(omit_final_dot=True).lower()))
        else:
            out.append((0, r.to_text()))
    out.sort(key=lambda item: item[0])  # stable: only MX reorders
    return tuple(text for _, text in out)


def _negative_ttl(response: object) -> int:
    """RFC 2308 §5: a negative answer lives min(SOA TTL, SOA MINIMUM); without an SOA, briefly."""
    authority = getattr(response, "authority", None) or []
    for rrset in authority:
        for r in rrset:
            if isinstance(r, dns.rdtypes.ANY.SOA.SOA):
                return int(min(rrset.ttl, r.minimum))
    return NEGATIVE_TTL_WITHOUT_SOA
