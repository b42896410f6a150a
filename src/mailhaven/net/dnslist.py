"""DNS lists (RFC 5782): the sites as configured, their query names, and A-record lookups.

Sites: `parse_site` reads postscreen's syntax (postscreen(8) postscreen_dnsbl_sites),
`zone[=filter][*weight]`; a filter gives each octet of a matching answer as a number or a
bracketed list of numbers and ranges (`127.0.0.[2;4..11]`). Here, below `config`, so loading a
configuration checks every site. Query names: `client_query` (RFC 5782 §2.1: reversed octets;
§2.4: reversed nibbles for IPv6) and `domain_query` (§2.2, right-hand-side lists).

Lookups: separate from `net.dns` (delivery's resolver) on purpose: a list query wants the raw
outcome of one name, not MX logic, and its answers are data (127.0.0.x), not hosts. In: a name
such as `2.0.0.127.zen.example`. Out: a `ListAnswer`, never an exception: the IPv4 addresses (empty for
NXDOMAIN/NODATA, i.e. "not listed"), the TTL to cache them for, or `failed` ("timeout",
"server failure", ...) when there is no answer to believe.

With `nameservers` given the resolver is built with `configure=False`, so no system
configuration (and no real DNS) is read: that is how the tests run. Every query is bounded by
`timeout` (the resolver's lifetime).

SECURITY: the name is built by `checks.dnsbl` from an address or a validated domain; answers
are only parsed as IPv4 addresses.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver

from mailhaven.net.ipaddr import client_ip

#: What NXDOMAIN is cached for when its SOA gives no better figure (RFC 2308 §5 suggests
#: 1-3 hours as a ceiling; lists change fast, so less).
NEGATIVE_TTL = 300


#: RFC 5782 §2.3: DNSxL entries are A records in 127.0.0.0/8.
LIST_NETWORK = ipaddress.ip_network("127.0.0.0/8")
#: Answers lists use for errors, not listings (Spamhaus: 127.255.255.252..255).
ERROR_NETWORK = ipaddress.ip_network("127.255.255.0/24")
#: postscreen's default weight.
DEFAULT_WEIGHT = 1

_SITE = re.compile(r"^(?P<zone>[A-Za-z0-9_.-]+?)(?:=(?P<filter>[0-9.\[\];]+))?(?:\*(?P<weight>-?\d+))?$")
_OCTET = re.compile(r"^(\d{1,3})$|^\[([0-9.;]+)\]$")


class SiteError(ValueError):
    """A site specification that cannot be parsed; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Site:
    """One list: its zone, an optional filter (per octet, the allowed values), its weight."""

    zone: str
    octets: tuple[frozenset[int], ...] | None = None
    weight: int = DEFAULT_WEIGHT
    spec: str = ""

    def matches(self, answer: ipaddress.IPv4Address) -> bool:
        if answer not in LIST_NETWORK:
            return False
        if self.octets is None:
            return answer not in ERROR_NETWORK
        return all(o in allowed for o, allowed in zip(answer.packed, self.octets, strict=True))


def _octet(text: str, spec: str) -> frozenset[int]:
    found = _OCTET.match(text)
    if found is None:
        raise SiteError(f"{spec!r}: bad filter octet {text!r}")
    if found.group(1) is not None:
        values = {int(found.group(1))}
    else:
        values = set()
        for item in found.group(2).split(";"):
            low, dots, high = item.partition("..")
            if not low.isdigit() or (dots and not high.isdigit()):
                raise SiteError(f"{spec!r}: bad range {item!r} (n or n..m)")
            values.update(range(int(low), int(high if dots else low) + 1))
    if not values or max(values) > 255 or min(values) < 0:
        raise SiteError(f"{spec!r}: filter octets are 0..255")
    return frozenset(values)


def parse_site(spec: str) -> Site:
    """`zone[=filter][*weight]` (postscreen_dnsbl_sites syntax) as a `Site`, or SiteError."""
    text = spec.strip()
    found = _SITE.match(text)
    if found is None:
        raise SiteError(f"{spec!r}: expected zone[=filter][*weight], e.g. zen.example=127.0.0.[2..11]*3")
    zone = found.group("zone").lower().strip(".")
    if "." not in zone or ".." in zone:
        raise SiteError(f"{spec!r}: {zone!r} is not a DNS zone")
    octets = None
    if found.group("filter"):
        parts = _split_filter(found.group("filter"))
        if len(parts) != 4:
            raise SiteError(f"{spec!r}: a filter has four octets, e.g. 127.0.0.[2..11]")
        octets = tuple(_octet(p, spec) for p in parts)
    weight = int(found.group("weight")) if found.group("weight") else DEFAULT_WEIGHT
    return Site(zone, octets, weight, text)


def _split_filter(text: str) -> list[str]:
    """Split at the dots outside brackets: `127.0.[0..255].1` -> 4 parts."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == "." and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def client_query(address: str, zone: str) -> str | None:
    """RFC 5782 §2.1/§2.4: `2.0.0.127.zone`, or the 32 nibbles of an IPv6 address; None when
    `address` is not an IP address (nothing to ask)."""
    ip = client_ip(address)
    if ip is None:
        return None
    if isinstance(ip, ipaddress.IPv4Address):
        return ".".join(reversed(str(ip).split("."))) + "." + zone
    return ".".join(reversed(ip.exploded.replace(":", ""))) + "." + zone


#: RFC 1035 §2.3.4: a name is at most 253 characters as text.
MAX_NAME = 253


def domain_query(domain: str, zone: str) -> str | None:
    """RFC 5782 §2.2: `domain.zone` for a right-hand-side list; None when that is no name."""
    name = domain.lower().strip(".")
    if not name or name.startswith("[") or "." not in name:
        return None
    query = f"{name}.{zone}"
    if len(query) > MAX_NAME or any(not label or len(label) > 63 for label in query.split(".")):
        return None
    return query


@dataclass(frozen=True, slots=True)
class ListAnswer:
    addresses: tuple[str, ...] = ()
    ttl: int = 0
    failed: str | None = None


class ListResolver:
    """One dnspython resolver for every list query of a service."""

    def __init__(self, nameservers: list[tuple[str, int]] | None, timeout: float) -> None:
        self.nameservers = nameservers
        if nameservers is None:
            self._resolver = dns.asyncresolver.Resolver()  # /etc/resolv.conf
        else:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, port) for host, port in nameservers
            ]
        self._resolver.lifetime = timeout
        self._resolver.timeout = min(timeout, 2.0)  # per try, so a lost UDP packet is retried
        self._resolver.cache = None

    @property
    def timeout(self) -> float:
        return float(self._resolver.lifetime)

    @timeout.setter
    def timeout(self, value: float) -> None:
        self._resolver.lifetime = value
        self._resolver.timeout = min(value, 2.0)

    async def query(self, name: str) -> ListAnswer:
        try:
            answer = await self._resolver.resolve(dns.name.from_text(name), "A", search=False)
        except dns.resolver.NXDOMAIN as err:
            return ListAnswer((), _negative_ttl(err))
        except dns.resolver.NoAnswer:
            return ListAnswer((), NEGATIVE_TTL)
        except dns.exception.Timeout:
            return ListAnswer(failed="timeout")
        except dns.resolver.NoNameservers:  # SERVFAIL or REFUSED from every server
            return ListAnswer(failed="server failure")
        except dns.exception.DNSException as err:
            return ListAnswer(failed=f"resolver error: {type(err).__name__}")
        ttl = answer.rrset.ttl if answer.rrset is not None else 0
        return ListAnswer(tuple(r.to_text() for r in answer), int(ttl))


def _negative_ttl(err: dns.resolver.NXDOMAIN) -> int:
    """RFC 2308 §5: a negative answer lives for min(SOA TTL, SOA MINIMUM) when it has one."""
    try:
        for response in err.responses().values():  # type: ignore[no-untyped-call]
            for rrset in response.authority:
                for rdata in rrset:
                    minimum = getattr(rdata, "minimum", None)
                    if minimum is not None:
                        return int(min(rrset.ttl, minimum, NEGATIVE_TTL))
    except Exception:  # an odd response shape: the default is fine
        pass
    return NEGATIVE_TTL
