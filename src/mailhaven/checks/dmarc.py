"""DMARC (RFC 7489): does the author's domain (From:) stand behind this message?

In: the RFC5322.From domain, the SPF result for MAIL FROM (its domain) and the DKIM results, a
`Lookup`, and an `OrgDomains` (the organizational domain from the Public Suffix List, through
the maintained `publicsuffixlist` package, RFC 7489 §3.2). Out: a `DMARCResult` value: `pass`
when an identifier that passed is aligned with From (§3.1; `adkim`/`aspf` strict or relaxed),
`fail` otherwise, `none` when the domain publishes no policy, `temperror` when DNS failed (the
policy lookup, or a check whose pass would have been aligned), `permerror` for a From with
no usable domain. With the result come the published policy (`p=`, or `sp=` for a subdomain)
and the disposition after `pct=` sampling (§6.6.4: a sampled-out message gets the next
milder policy).

Policy discovery (§6.6.3): `_dmarc.<from domain>` TXT, else `_dmarc.<organizational domain>`;
exactly one record starting `v=DMARC1` or none counts. A record with an invalid `p=` but a
usable `rua=` is treated as `p=none` (§6.6.3 step 6); any other malformed record as no record.
RFC 9989 (DMARCbis) replaces the PSL with a DNS tree walk and drops `pct`; we follow RFC 7489,
which the issue names, and read `np=` (the bis policy for non-existent subdomains) nowhere yet.

SECURITY: records and From come from strangers; tags are parsed with bounded splitting and
unknown tags are ignored; the random source for `pct` is injectable so tests are exact.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from mailhaven.checks.dkim_verify import DKIMResult
from mailhaven.checks.spf import SPFResult
from mailhaven.net.dns import DNSAnswer, DNSError, Records

Result = Literal["none", "pass", "fail", "temperror", "permerror"]
Policy = Literal["none", "quarantine", "reject"]

_POLICIES: tuple[Policy, ...] = ("none", "quarantine", "reject")
#: A DMARC record longer than this is not parsed (records are a few hundred octets).
MAX_RECORD_LENGTH = 2048


class Lookup(Protocol):
    async def lookup(self, name: str, rdtype: str) -> DNSAnswer: ...


class OrgDomains:
    """Organizational domains (RFC 7489 §3.2) from the Public Suffix List. Loading the list
    takes a noticeable moment: build one at start-up and share it."""

    def __init__(self) -> None:
        from publicsuffixlist import PublicSuffixList

        self._psl = PublicSuffixList()

    def of(self, domain: str) -> str:
        """The registrable domain of `domain` (itself when it is a public suffix)."""
        domain = domain.lower().rstrip(".")
        found = self._psl.privatesuffix(domain)
        return str(found) if found else domain


@dataclass(frozen=True, slots=True)
class DMARCRecord:
    policy: Policy
    subdomain_policy: Policy
    percent: int = 100
    strict_dkim: bool = False
    strict_spf: bool = False


@dataclass(frozen=True, slots=True)
class DMARCResult:
    result: Result
    from_domain: str
    #: the policy that applies to this From domain (p=, or sp= for a subdomain); none without
    policy: Policy = "none"
    #: what to do after pct= sampling: the policy, or the next milder one
    disposition: Policy = "none"
    #: where the record was found (the From domain or its organizational domain)
    policy_domain: str = ""
    reason: str = ""


def parse_record(text: str) -> DMARCRecord | None:
    """RFC 7489 §6.3/§6.4 tags; None unless the text is a usable DMARC record."""
    if len(text) > MAX_RECORD_LENGTH:
        return None
    tags: dict[str, str] = {}
    for i, part in enumerate(text.split(";")):
        name, eq, value = part.partition("=")
        name, value = name.strip().lower(), value.strip()
        if i == 0:
            if name != "v" or value != "DMARC1":
                return None
            continue
        if eq and name not in tags:
            tags[name] = value
    policy = tags.get("p", "").lower()
    if policy not in _POLICIES:
        if not tags.get("rua", "").lower().startswith("mailto:"):
            return None
        policy = "none"  # §6.6.3 step 6: a bad p= with a valid rua= is p=none
    sub = tags.get("sp", "").lower()
    percent = tags.get("pct", "100")
    return DMARCRecord(
        policy=_policy(policy),
        subdomain_policy=_policy(sub) if sub in _POLICIES else _policy(policy),
        percent=min(100, int(percent)) if percent.isdigit() else 100,
        strict_dkim=tags.get("adkim", "r").lower() == "s",
        strict_spf=tags.get("aspf", "r").lower() == "s",
    )


def _policy(text: str) -> Policy:
    for p in _POLICIES:
        if p == text:
            return p
    return "none"


async def discover(
    domain: str, org: str, lookup: Lookup
) -> tuple[DMARCRecord, str] | DNSError | None:
    """§6.6.3: the record for `domain`, else for its organizational domain `org`."""
    for name in dict.fromkeys((domain, org)):
        answer = await lookup.lookup(f"_dmarc.{name}", "TXT")
        if isinstance(answer, DNSError):
            return answer
        texts = answer.values if isinstance(answer, Records) else ()
        candidates = [t for t in texts if t[:8].lower().replace(" ", "").startswith("v=dmarc1")]
        if len(candidates) == 1:
            record = parse_record(candidates[0])
            if record is not None:
                return record, name
    return None


def aligned(identifier: str, from_domain: str, org: str, orgs: OrgDomains, strict: bool) -> bool:
    """RFC 7489 §3.1: strict means equal; relaxed means the same organizational domain."""
    identifier = identifier.lower().rstrip(".")
    if identifier == from_domain:
        return True
    return not strict and orgs.of(identifier) == org


async def evaluate(
    from_domain: str,
    spf: SPFResult | None,
    dkim: Sequence[DKIMResult],
    lookup: Lookup,
    orgs: OrgDomains,
    *,
    rng: random.Random | None = None,
) -> DMARCResult:
    """The DMARC result for a message whose From domain is `from_domain` (see the module)."""
    domain = from_domain.lower().rstrip(".")
    if not domain or "." not in domain:
        return DMARCResult("permerror", domain, reason="no usable From domain")
    org = orgs.of(domain)
    found = await discover(domain, org, lookup)
    if isinstance(found, DNSError):
        return DMARCResult("temperror", domain, reason=f"policy lookup: {found.reason}")
    if found is None:
        return DMARCResult("none", domain, reason="no DMARC record")
    record, where = found
    policy = record.policy if where == domain else record.subdomain_policy
    uncertain = False
    for sig in dkim:
        if aligned(sig.domain, domain, org, orgs, record.strict_dkim):
            if sig.result == "pass":
                return DMARCResult("pass", domain, policy, "none", where, f"dkim d={sig.domain}")
            uncertain = uncertain or sig.result == "temperror"
    if spf is not None and aligned(spf.domain, domain, org, orgs, record.strict_spf):
        if spf.result == "pass":
            return DMARCResult("pass", domain, policy, "none", where, f"spf {spf.domain}")
        uncertain = uncertain or spf.result == "temperror"
    disposition = policy
    if record.percent < 100 and (rng or random).randrange(100) >= record.percent:
        disposition = _POLICIES[max(0, _POLICIES.index(policy) - 1)]
    if uncertain:
        return DMARCResult(
            "temperror", domain, policy, disposition, where, "an aligned check failed temporarily"
        )
    return DMARCResult("fail", domain, policy, disposition, where, "no aligned pass")
