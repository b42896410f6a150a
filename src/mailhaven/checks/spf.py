"""SPF, RFC 7208: may this client IP send mail for this domain? An async `check_host()`.

In: the client IP, the identity's domain and sender (`check_mailfrom` for MAIL FROM, with
`postmaster@<helo>` for the null sender, `check_helo` for the HELO name, RFC 7208 §2.3/§2.4),
and a `Lookup` (our cached async resolver, `net.dns.Resolver`). Out: an `SPFResult` value
(`none`, `neutral`, `pass`, `fail`, `softfail`, `temperror`, `permerror`; §2.6), never an
exception, with the reason and, for `fail`, the domain's explanation (`exp=`, §6.2).

Why our own evaluator and not pyspf: pyspf is synchronous and does its own DNS (pydns or
dnspython's blocking resolver), so each check would hold a thread for the whole length of its
lookups and bypass our TTL cache; RFC 7208's evaluation is small. The record is parsed whole
before any term is evaluated (a syntax error anywhere is `permerror`, §4.6), then terms run in
order, each DNS question going through `Lookup`.

Limits (§4.6.4): at most `MAX_DNS_MECHANISMS` terms that cause DNS queries (include, a, mx,
ptr, exists, redirect) over the whole evaluation, nested includes counted too; at most
`MAX_VOID_LOOKUPS` answers that are NXDOMAIN or empty; an `mx` with more than `MAX_MX_NAMES`
hosts is a permerror; `ptr` and `%{p}` look at no more than `MAX_PTR_NAMES` names. Together
they bound the work any record (loops, 20 includes) can cause: a few dozen queries.

SECURITY: the records, and the sender and HELO that feed macros, come from strangers; the
parser accepts only RFC 7208's grammar (7-bit, no control characters), expansions are capped at
253 octets (§7.3), and every lookup is bounded by the resolver's timeout.
"""

from __future__ import annotations

import ipaddress
import re
import string
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from mailhaven.net.dns import DNSAnswer, DNSError, NoRecords, Records
from mailhaven.net.ipaddr import IPAddress, client_ip

Result = Literal["none", "neutral", "pass", "fail", "softfail", "temperror", "permerror"]

#: RFC 7208 §4.6.4: terms that cause DNS queries, per check_host() evaluation.
MAX_DNS_MECHANISMS = 10
#: RFC 7208 §4.6.4: void lookups (NXDOMAIN or no answer) allowed; more is permerror.
MAX_VOID_LOOKUPS = 2
#: RFC 7208 §4.6.4: an `mx` mechanism may name at most 10 hosts.
MAX_MX_NAMES = 10
#: RFC 7208 §4.6.4/§5.5: only the first 10 PTR names are validated.
MAX_PTR_NAMES = 10
#: RFC 7208 §7.3 / RFC 1035 §2.3.4: an expanded domain name is cut to 253 octets.
MAX_DOMAIN_LENGTH = 253
#: A record longer than this is not looked at (two full-length TXT answers' worth).
MAX_RECORD_LENGTH = 4096
#: RFC 7208 §6.2: explanations are for humans; a longer one is cut.
MAX_EXPLANATION = 400

QUALIFIERS: dict[str, Result] = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_MECHANISMS = frozenset({"all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists"})
_DELIMITERS = ".-+,/_="
_MACRO = re.compile(r"%(?:\{([a-zA-Z])(\d*)(r?)([.\-+,/_=]*)\}|(.)|$)")
_MODIFIER = re.compile(r"([a-zA-Z][a-zA-Z0-9_.\-]*)=(.*)", re.S)
_MECHANISM = re.compile(r"([+\-~?]?)([a-zA-Z][a-zA-Z0-9_.\-]*)(.*)", re.S)
_TOPLABEL = re.compile(r"(?:[a-z0-9]*[a-z][a-z0-9]*|[a-z0-9]+-[a-z0-9\-]*[a-z0-9])\.?", re.I)
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_\-]{1,63}(?<!-)")
_CIDR = re.compile(r"(?:/(0|[1-9]\d{0,2}))?(?://(0|[1-9]\d{0,2}))?")
_SPEC_AND_CIDR = re.compile(r"(.*?)((?:/\d+)?(?://\d+)?)", re.S)
_MACRO_LETTERS = frozenset("slodiphv")
_EXP_LETTERS = frozenset("slodiphvcrt")
_URL_SAFE = string.ascii_letters + string.digits + "-._~"


class Lookup(Protocol):
    """What the evaluator needs from DNS (`net.dns.Resolver` provides it)."""

    async def lookup(self, name: str, rdtype: str) -> DNSAnswer: ...


@dataclass(frozen=True, slots=True)
class SPFResult:
    result: Result
    #: the domain whose record decided (the identity's domain)
    domain: str
    #: what decided, for logs and the Authentication-Results comment
    reason: str = ""
    #: the domain's explanation (`exp=`), for a `fail` only
    explanation: str = ""
    #: terms that caused DNS lookups
    lookups: int = 0


class _PermError(Exception):
    """Internal: ends the evaluation with permerror (never leaves this module)."""


class _TempError(Exception):
    """Internal: ends the evaluation with temperror (never leaves this module)."""


@dataclass(frozen=True, slots=True)
class _Term:
    qualifier: Result
    name: str
    domain_spec: str | None = None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    cidr4: int = 32
    cidr6: int = 128
    text: str = ""


@dataclass(slots=True)
class _Record:
    terms: list[_Term] = field(default_factory=list)
    redirect: str | None = None
    exp: str | None = None


def is_domain_name(name: str) -> bool:
    """RFC 7208 §4.3: a syntactically valid multi-label domain name (not an IP literal)."""
    name = name.rstrip(".")
    if not name or len(name) > MAX_DOMAIN_LENGTH or "." not in name:
        return False
    return all(_LABEL.fullmatch(label) for label in name.split("."))


def _check_macro_string(text: str, letters: frozenset[str]) -> None:
    """Raise _PermError unless `text` is a valid macro-string (RFC 7208 §7.1)."""
    for ch in text:
        if not 0x21 <= ord(ch) <= 0x7E:
            raise _PermError(f"invalid character {ch!r} in {text!r}")
    pos = 0
    while (at := text.find("%", pos)) >= 0:
        m = _MACRO.match(text, at)
        if m is None or m.group(0) == "%":
            raise _PermError(f"invalid macro in {text!r}")
        if m.group(1) is not None:
            if m.group(1).lower() not in letters:
                raise _PermError(f"invalid macro letter in {text!r}")
            if m.group(2) and int(m.group(2)) == 0:
                raise _PermError(f"zero digits transformer in {text!r}")
        elif m.group(5) not in ("%", "_", "-"):
            raise _PermError(f"invalid macro escape in {text!r}")
        pos = m.end()


def _check_domain_spec(spec: str) -> None:
    """RFC 7208 §7.1: a macro-string ending in a macro or in '.' toplabel ['.']."""
    _check_macro_string(spec, _MACRO_LETTERS)
    if spec.endswith("}"):
        return
    last = spec.rstrip(".").rpartition(".")[2] if "." in spec.rstrip(".") else None
    if last is None or "%" in last or not _TOPLABEL.fullmatch(last):
        raise _PermError(f"invalid domain-spec {spec!r}")


def parse_record(text: str) -> _Record:
    """The terms of an SPF record (its "v=spf1" already checked); _PermError on any syntax
    error (RFC 7208 §4.6, §5, §6, §12)."""
    record = _Record()
    for word in text.split(" ")[1:]:
        if not word:
            continue  # terms are separated by one or more spaces (§4.6.1)
        if any(not 0x21 <= ord(ch) <= 0x7E for ch in word):
            raise _PermError(f"invalid character in term {word!r}")
        modifier = _MODIFIER.fullmatch(word)
        if modifier is not None and ":" not in modifier.group(1):
            name, value = modifier.group(1).lower(), modifier.group(2)
            if name in ("redirect", "exp"):
                if getattr(record, name) is not None:
                    raise _PermError(f"more than one {name}= modifier")
                _check_domain_spec(value)
                setattr(record, name, value)
            else:
                _check_macro_string(value, _MACRO_LETTERS)  # unknown modifiers: ignored
            continue
        record.terms.append(_parse_mechanism(word))
    return record


def _parse_mechanism(word: str) -> _Term:
    m = _MECHANISM.fullmatch(word)
    if m is None:
        raise _PermError(f"unknown term {word!r}")
    qualifier = QUALIFIERS[m.group(1) or "+"]
    name, rest = m.group(2).lower(), m.group(3)
    if name not in _MECHANISMS:
        raise _PermError(f"unknown mechanism {word!r}")
    if name == "all":
        if rest:
            raise _PermError(f"invalid all {word!r}")
        return _Term(qualifier, name, text=word)
    if name in ("ip4", "ip6"):
        if not rest.startswith(":"):
            raise _PermError(f"{name} needs an address: {word!r}")
        return _Term(qualifier, name, network=_parse_network(name, rest[1:]), text=word)
    if name in ("include", "exists"):
        if not rest.startswith(":") or len(rest) == 1:
            raise _PermError(f"{name} needs a domain: {word!r}")
        _check_domain_spec(rest[1:])
        return _Term(qualifier, name, rest[1:], text=word)
    # a, mx, ptr: [":" domain-spec] (a, mx: [dual-cidr-length])
    spec: str | None = None
    cidr = rest
    if rest.startswith(":"):
        # the prefix lengths are a suffix: a domain-spec may itself contain "/" (§7.1)
        split = _SPEC_AND_CIDR.fullmatch(rest[1:])
        assert split is not None  # the pattern matches any string
        spec, cidr = split.group(1), split.group(2)
        if not spec:
            raise _PermError(f"empty domain in {word!r}")
        _check_domain_spec(spec)
    if name == "ptr":
        if cidr:
            raise _PermError(f"ptr takes no prefix length: {word!r}")
        return _Term(qualifier, name, spec, text=word)
    lengths = _CIDR.fullmatch(cidr)
    if lengths is None:
        raise _PermError(f"invalid prefix length in {word!r}")
    cidr4 = int(lengths.group(1)) if lengths.group(1) is not None else 32
    cidr6 = int(lengths.group(2)) if lengths.group(2) is not None else 128
    if cidr4 > 32 or cidr6 > 128:
        raise _PermError(f"prefix length out of range in {word!r}")
    return _Term(qualifier, name, spec, cidr4=cidr4, cidr6=cidr6, text=word)


def _parse_network(kind: str, text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    address, slash, length = text.partition("/")
    if slash and (not length.isdigit() or (length != "0" and length.startswith("0"))):
        raise _PermError(f"invalid prefix length {text!r}")
    try:
        ip = ipaddress.IPv4Address(address) if kind == "ip4" else ipaddress.IPv6Address(address)
        bits = int(length) if slash else ip.max_prefixlen
        if bits > ip.max_prefixlen:
            raise _PermError(f"prefix length out of range {text!r}")
        return ipaddress.ip_network(f"{ip}/{bits}", strict=False)
    except ValueError:
        raise _PermError(f"invalid {kind} network {text!r}") from None


def select_record(texts: Sequence[str]) -> str | None:
    """RFC 7208 §4.5: the one record starting with "v=spf1" (then a space or its end); None
    when there is none; _PermError when there are several."""
    found = [t for t in texts if t[:6].lower() == "v=spf1" and (len(t) == 6 or t[6] == " ")]
    if len(found) > 1:
        raise _PermError("more than one SPF record")
    return found[0] if found else None


def _ip(address: str) -> IPAddress:
    """The client address; an IPv4-mapped IPv6 address counts as IPv4 (RFC 7208 §5)."""
    ip = client_ip(address)
    if ip is None:
        raise ValueError(f"not an IP address: {address!r}")
    return ip


class _Evaluation:
    """One check_host() run with its shared counters (nested includes share them)."""

    def __init__(
        self, lookup: Lookup, ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
        sender: str, helo: str, receiver: str,
    ) -> None:  # fmt: skip
        self.dns = lookup
        self.ip = ip
        self.sender = sender
        self.helo = helo
        self.receiver = receiver
        self.lookups = 0
        self.voids = 0
        self._validated: str | None = None

    # -- DNS -------------------------------------------------------------------------------
    async def query(self, name: str, rdtype: str, *, void_counts: bool = True) -> tuple[str, ...]:
        answer = await self.dns.lookup(name, rdtype)
        if isinstance(answer, DNSError):
            raise _TempError(f"DNS {answer.reason} for {name} {rdtype}")
        if isinstance(answer, NoRecords) or not answer.values:
            if void_counts:
                self.voids += 1
                if self.voids > MAX_VOID_LOOKUPS:
                    raise _PermError("too many void DNS lookups")
            return ()
        return answer.values

    def count(self) -> None:
        self.lookups += 1
        if self.lookups > MAX_DNS_MECHANISMS:
            raise _PermError("too many DNS lookups")

    async def addresses(self, name: str, *, void_counts: bool = True) -> list[str]:
        rdtype = "A" if self.ip.version == 4 else "AAAA"
        return list(await self.query(name, rdtype, void_counts=void_counts))

    # -- check_host ------------------------------------------------------------------------
    async def check_host(
        self, domain: str, depth: int = 0, *, explain: bool = True
    ) -> tuple[Result, str, str]:
        """(result, reason, explanation) for `domain` (RFC 7208 §4). `explain`: false inside
        an include, whose explanation is never used (§6.2); a redirect's replaces ours."""
        if not is_domain_name(domain):
            return "none", f"{domain!r} is not a domain name", ""
        answer = await self.dns.lookup(domain, "TXT")
        if isinstance(answer, DNSError):
            raise _TempError(f"DNS {answer.reason} for {domain} TXT")
        texts = answer.values if isinstance(answer, Records) else ()
        text = select_record([t for t in texts if len(t) <= MAX_RECORD_LENGTH])
        if text is None:
            return "none", f"no SPF record for {domain}", ""
        record = parse_record(text)
        for term in record.terms:
            if await self.matches(term, domain, depth):
                explanation = ""
                if term.qualifier == "fail" and record.exp is not None and explain:
                    explanation = await self.explain(record.exp, domain)
                return term.qualifier, f"{domain}: {term.text} matched", explanation
        if record.redirect is not None:
            self.count()
            if _uses_p(record.redirect):
                await self.validated_name(domain)
            target = self.expand(record.redirect, domain, domain_name=True)
            result, reason, explanation = await self.check_host(
                target, depth + 1, explain=explain
            )
            if result == "none":
                raise _PermError(f"redirect to {target}: no SPF record")
            return result, reason, explanation
        return "neutral", f"{domain}: no term matched", ""

    async def matches(self, term: _Term, domain: str, depth: int) -> bool:
        ip = self.ip
        if term.domain_spec is not None and _uses_p(term.domain_spec):
            await self.validated_name(domain)  # `expand` is synchronous
        match term.name:
            case "all":
                return True
            case "ip4" | "ip6":
                return term.network is not None and ip in term.network
            case "include":
                self.count()
                assert term.domain_spec is not None
                target = self.expand(term.domain_spec, domain, domain_name=True)
                if depth >= MAX_DNS_MECHANISMS:
                    raise _PermError("includes nested too deep")
                result, _, _ = await self.check_host(target, depth + 1, explain=False)
                if result == "pass":
                    return True
                if result == "none":
                    raise _PermError(f"include:{target}: no SPF record")
                return False
            case "a":
                self.count()
                target = self.target(term, domain)
                return any(self._in(a, term) for a in await self.addresses(target))
            case "mx":
                self.count()
                hosts = await self.query(self.target(term, domain), "MX")
                if len(hosts) > MAX_MX_NAMES:
                    raise _PermError("mx: more than 10 MX hosts")
                for host in hosts:
                    if host in ("", "."):
                        continue
                    addresses = await self.addresses(host, void_counts=False)
                    if any(self._in(a, term) for a in addresses):
                        return True
                return False
            case "ptr":
                self.count()
                target = self.target(term, domain).lower().rstrip(".")
                for name in await self.validated_names():
                    if name == target or name.endswith("." + target):
                        return True
                return False
            case "exists":
                self.count()
                assert term.domain_spec is not None
                target = self.expand(term.domain_spec, domain, domain_name=True)
                answer = await self.query(target, "A")  # always A (§5.7)
                return bool(answer)
        raise _PermError(f"unknown mechanism {term.name}")  # pragma: no cover

    def target(self, term: _Term, domain: str) -> str:
        if term.domain_spec is None:
            return domain
        return self.expand(term.domain_spec, domain, domain_name=True)

    def _in(self, address: str, term: _Term) -> bool:
        try:
            other = ipaddress.ip_address(address)
        except ValueError:
            return False
        if other.version != self.ip.version:
            return False
        bits = term.cidr4 if other.version == 4 else term.cidr6
        return self.ip in ipaddress.ip_network(f"{other}/{bits}", strict=False)

    async def validated_names(self) -> list[str]:
        """RFC 7208 §5.5: the PTR names of the client whose addresses include it."""
        reverse = self.ip.reverse_pointer
        names = await self.query(reverse, "PTR")
        found: list[str] = []
        for name in names[:MAX_PTR_NAMES]:
            try:
                addresses = await self.addresses(name, void_counts=False)
            except _TempError:
                continue  # §5.5: a failed lookup for one name only skips it
            if any(_ip(a) == self.ip for a in addresses if _is_address(a)):
                found.append(name.lower().rstrip("."))
        return found

    async def validated_name(self, domain: str) -> str:
        """The `%{p}` macro (§7.3): a validated name, preferring `domain` or its subdomain."""
        if self._validated is None:
            try:
                names = await self.validated_names()
            except (_TempError, _PermError):
                names = []
            pick = [n for n in names if n == domain or n.endswith("." + domain)] or names
            self._validated = pick[0] if pick else "unknown"
        return self._validated

    async def explain(self, spec: str, domain: str) -> str:
        """RFC 7208 §6.2: the explanation string, or "" on any problem."""
        try:
            if _uses_p(spec):
                await self.validated_name(domain)
            name = self.expand(spec, domain, domain_name=True)
            answer = await self.dns.lookup(name, "TXT")
            if not isinstance(answer, Records) or len(answer.values) != 1:
                return ""
            text = answer.values[0]
            _check_macro_string(text.replace(" ", "_"), _EXP_LETTERS)
            if _uses_p(text):
                await self.validated_name(domain)
            return self.expand(text, domain, exp=True)[:MAX_EXPLANATION]
        except (_PermError, _TempError, ValueError):
            return ""

    # -- macros ----------------------------------------------------------------------------
    def expand(
        self, text: str, domain: str, *, domain_name: bool = False, exp: bool = False
    ) -> str:
        """RFC 7208 §7.3 macro expansion (`%{p}` is resolved by `validated_name` first)."""
        out: list[str] = []
        pos = 0
        while (at := text.find("%", pos)) >= 0:
            out.append(text[pos:at])
            m = _MACRO.match(text, at)
            if m is None or m.group(0) == "%":
                raise _PermError(f"invalid macro in {text!r}")
            pos = m.end()
            if m.group(1) is None:
                out.append({"%": "%", "_": " ", "-": "%20"}[m.group(5)])
                continue
            letter, digits, reverse, delimiters = m.groups()[:4]
            value = self._macro_value(letter.lower(), domain, exp)
            parts = re.split("[" + re.escape(delimiters or ".") + "]", value)
            if reverse:
                parts.reverse()
            if digits:
                parts = parts[-int(digits) :]
            value = ".".join(parts)
            if letter.isupper():
                value = urllib.parse.quote(value, safe=_URL_SAFE)
            out.append(value)
        out.append(text[pos:])
        result = "".join(out)
        if domain_name:
            while len(result) > MAX_DOMAIN_LENGTH and "." in result:
                result = result.partition(".")[2]
        return result

    def _macro_value(self, letter: str, domain: str, exp: bool) -> str:
        local, _, sender_domain = self.sender.rpartition("@")
        match letter:
            case "s":
                return self.sender
            case "l":
                return local or "postmaster"
            case "o":
                return sender_domain
            case "d":
                return domain
            case "i":
                if self.ip.version == 4:
                    return str(self.ip)
                return ".".join(self.ip.exploded.replace(":", ""))
            case "p":
                return self._validated or "unknown"
            case "v":
                return "in-addr" if self.ip.version == 4 else "ip6"
            case "h":
                return self.helo
            case "c" if exp:
                return str(self.ip)
            case "r" if exp:
                return self.receiver or "unknown"
            case "t" if exp:
                return str(int(time.time()))
        raise _PermError(f"macro %{{{letter}}} not allowed here")


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _uses_p(text: str) -> bool:
    return re.search(r"%\{[pP]", text) is not None


async def check_host(
    lookup: Lookup, ip: str, domain: str, sender: str, *, helo: str = "", receiver: str = ""
) -> SPFResult:
    """RFC 7208 §4 check_host(): the SPF result for `ip` sending as `sender` from `domain`."""
    try:
        client = _ip(ip)
    except ValueError:
        return SPFResult("permerror", domain, f"not an IP address: {ip!r}")
    if "@" not in sender:
        sender = f"postmaster@{domain}"
    elif sender.startswith("@"):
        sender = "postmaster" + sender
    evaluation = _Evaluation(lookup, client, sender, helo, receiver)
    domain = domain.rstrip(".")
    try:
        result, reason, explanation = await evaluation.check_host(domain)
    except _PermError as err:
        return SPFResult("permerror", domain, str(err), lookups=evaluation.lookups)
    except _TempError as err:
        return SPFResult("temperror", domain, str(err), lookups=evaluation.lookups)
    return SPFResult(result, domain, reason, explanation, evaluation.lookups)


async def check_mailfrom(
    lookup: Lookup, ip: str, mail_from: str, helo: str, *, receiver: str = ""
) -> SPFResult:
    """The MAIL FROM identity (RFC 7208 §2.4); the null sender is `postmaster@<helo>`."""
    if not mail_from:
        return await check_helo(lookup, ip, helo, receiver=receiver)
    domain = mail_from.rpartition("@")[2]
    return await check_host(lookup, ip, domain, mail_from, helo=helo, receiver=receiver)


async def check_helo(lookup: Lookup, ip: str, helo: str, *, receiver: str = "") -> SPFResult:
    """The HELO identity (RFC 7208 §2.3); `none` when the HELO is no domain name."""
    name = helo.rstrip(".")
    if not is_domain_name(name):
        return SPFResult("none", name, "HELO is not a domain name")
    return await check_host(
        lookup, ip, name, f"postmaster@{name}", helo=name, receiver=receiver
    )
