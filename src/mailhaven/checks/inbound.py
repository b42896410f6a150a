"""Inbound mail authentication for one message: run SPF, DKIM, DMARC and ARC, then decide.

In: the message as received (bytes), the client's IP, HELO, MAIL FROM and recipients. Out: a
`Verdict` value: a refusal `Reply` (550 5.7.1 for a DMARC `p=reject` failure, 451 4.7.x for a
DNS failure when so configured) or None, the header fields to add (our one
`Authentication-Results:` and, for a DMARC quarantine, the quarantine field), the spans of
forged `Authentication-Results:` fields to remove, and a one-line summary for the log.

Order and concurrency: SPF for MAIL FROM and HELO, DKIM key lookups and the ARC key lookups run
at once; DMARC follows (it needs the SPF and DKIM results and the From domain). All DNS goes
through the shared cached resolver; the whole check is bounded by `CHECK_TIMEOUT`, after which
every unfinished check is a temperror.

Policy (`DomainPolicy`, per recipient domain, with a default): DMARC `reject` -> 550 5.7.1
(`dmarc_reject`), `quarantine` -> accepted with `quarantine_header` added (the hook where a
Junk folder can take over); an SPF `fail` alone is recorded but refused only when `spf_reject`
is set (then 550 5.7.23, RFC 7372); a temporary DNS failure that could change the outcome is
`temperror = "accept"` (default, as OpenDMARC and policyd-spf do) or `"defer"` (451 4.7.5),
never a 5xx. With several recipient domains the most lenient policy wins: a message is refused
only when every recipient's domain would refuse it, since one reply answers them all.

SECURITY: trusted networks and authenticated clients never come here (`applies`); everything
else in the message is hostile input for the check modules, which return values only. A
`Verdict` never carries a traceback: an unexpected error in a check is logged by the caller and
the message is accepted without our header (fail open, like a milter with `default_action`
accept), because a bug here must not bounce the world's mail.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from mailhaven.checks import arc_verify, authresults, dkim_verify, dmarc, spf
from mailhaven.checks.arc_verify import ARCResult
from mailhaven.checks.dkim_verify import DKIMResult
from mailhaven.checks.dmarc import DMARCResult, OrgDomains
from mailhaven.checks.spf import Lookup, SPFResult
from mailhaven.proto import replies as r
from mailhaven.proto.replies import Reply

#: RFC 7208 §4.6.4 asks SPF to allow at least 20 seconds; the other checks fit inside.
CHECK_TIMEOUT = 20.0
#: From: domains evaluated for DMARC when a message has several (RFC 7489 §6.6.1).
MAX_FROM_DOMAINS = 5
#: The longest SPF explanation quoted in a reply (RFC 5321 §4.5.3.1.5: lines up to 512 octets).
MAX_REPLY_TEXT = 300
#: Only this much of the message start is searched for the header block's end.
HEADER_LIMIT = 256 * 1024

TempAction = Literal["accept", "defer"]


@dataclass(frozen=True, slots=True)
class DomainPolicy:
    """What a recipient domain wants done with the results (see the module docstring)."""

    checks: bool = True
    dmarc_reject: bool = True
    spf_reject: bool = False
    temperror: TempAction = "accept"
    quarantine_header: str = "X-Mailhaven-Quarantine: dmarc"


@dataclass(frozen=True, slots=True)
class InboundSettings:
    #: our authserv-id (the configured hostname)
    authserv_id: str
    default: DomainPolicy = field(default_factory=DomainPolicy)
    domains: Mapping[str, DomainPolicy] = field(default_factory=dict)
    #: messages larger than this get no DKIM or ARC verification (and so no DMARC refusal)
    max_verify_size: int = 10 * 2**20


@dataclass(frozen=True, slots=True)
class Results:
    spf: SPFResult
    helo: SPFResult
    dkim: tuple[DKIMResult, ...]
    dmarc: DMARCResult
    arc: ARCResult


@dataclass(frozen=True, slots=True)
class Verdict:
    reply: Reply | None
    header: bytes = b""
    forged: tuple[tuple[int, int], ...] = ()
    summary: str = ""
    results: Results | None = None
    #: DMARC asked for quarantine (and nothing refused): the mailbox files it as spam
    quarantine: bool = False


def header_block(message: bytes) -> bytes:
    """The header section of `message`, with its final empty line (bounded search)."""
    head = message[:HEADER_LIMIT]
    for sep in (b"\r\n\r\n", b"\n\n"):
        at = head.find(sep)
        if at >= 0:
            return head[: at + len(sep)]
    return head


_UNFOLD = re.compile(rb"\r?\n(?=[ \t])")


def from_domains(header: bytes) -> list[str]:
    """The domains of the addresses in the From: fields (RFC 5322 §3.6.2), lower case."""
    values = []
    for line in _UNFOLD.sub(b"", header).splitlines():
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"from":
            values.append(value.decode("utf-8", "replace"))
    domains: list[str] = []
    for _, address in email.utils.getaddresses(values):
        domain = address.rpartition("@")[2].strip().strip(">").lower().rstrip(".")
        if domain and domain not in domains:
            domains.append(domain)
    return domains[:MAX_FROM_DOMAINS]


class InboundChecks:
    """Built once by the composition root; shared by every MX session."""

    def __init__(
        self,
        settings: InboundSettings,
        lookup: Lookup,
        *,
        trusted: Sequence[str] = (),
        orgs: OrgDomains | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.lookup = lookup
        self.trusted = [ipaddress.ip_network(n, strict=False) for n in trusted]
        self.orgs = orgs or OrgDomains()
        self.rng = rng

    def policies(self, recipients: Sequence[str]) -> list[DomainPolicy]:
        domains = {rcpt.rpartition("@")[2].lower().rstrip(".") for rcpt in recipients} or {""}
        return [self.settings.domains.get(d, self.settings.default) for d in sorted(domains)]

    def applies(self, client_ip: str, authenticated: bool, recipients: Sequence[str]) -> bool:
        """Checks run for untrusted, unauthenticated clients, unless every recipient's domain
        turned them off."""
        if authenticated:
            return False
        try:
            ip = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        if any(ip in net for net in self.trusted):
            return False
        return any(p.checks for p in self.policies(recipients))

    async def check(
        self, message: bytes, *, client_ip: str, helo: str, mail_from: str,
        recipients: Sequence[str], size: int | None = None,
    ) -> Verdict:  # fmt: skip
        """`size`: the whole message's, when `message` is only its start (a message above
        `max_verify_size` need not be read whole: it is not verified)."""
        results = await self.evaluate(
            message, client_ip=client_ip, helo=helo, mail_from=mail_from, size=size
        )
        header = header_block(message)
        forged = tuple(authresults.forged_fields(header, self.settings.authserv_id))
        policies = [p for p in self.policies(recipients) if p.checks]
        reply, quarantine = decide(results, policies)
        added = self.header(results, mail_from=mail_from, helo=helo)
        quarantine = quarantine and reply is None
        if quarantine:
            fields = {p.quarantine_header for p in policies if p.quarantine_header}
            added += b"".join(_field(f) for f in sorted(fields))
        return Verdict(reply, added, forged, summary(results), results, quarantine)

    async def evaluate(
        self, message: bytes, *, client_ip: str, helo: str, mail_from: str,
        size: int | None = None,
    ) -> Results:  # fmt: skip
        receiver = self.settings.authserv_id
        verify = (len(message) if size is None else size) <= self.settings.max_verify_size
        header = header_block(message)
        domains = from_domains(header)
        spf_task = spf.check_mailfrom(self.lookup, client_ip, mail_from, helo, receiver=receiver)
        helo_task = spf.check_helo(self.lookup, client_ip, helo, receiver=receiver)
        dkim_task = dkim_verify.verify(message, self.lookup) if verify else _none_dkim()
        arc_task = arc_verify.verify(message, self.lookup) if verify else _none_arc()
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                mail_spf, helo_spf, signatures, arc = await asyncio.gather(
                    spf_task, helo_task, dkim_task, arc_task
                )
                if not verify:
                    signatures = [DKIMResult("policy", reason="message too large to verify")]
                outcomes = [
                    await dmarc.evaluate(
                        d, mail_spf, signatures, self.lookup, self.orgs, rng=self.rng
                    )
                    for d in domains
                ]
        except TimeoutError:
            spf_domain = mail_from.rpartition("@")[2] or helo
            mail_spf = SPFResult("temperror", spf_domain, "checks timed out")
            helo_spf = SPFResult("temperror", helo, "checks timed out")
            signatures = [DKIMResult("temperror", reason="checks timed out")]
            arc = ARCResult("none")
            outcomes = [DMARCResult("temperror", d, reason="checks timed out") for d in domains]
        if not outcomes:
            outcomes = [DMARCResult("permerror", "", reason="no From domain")]
        if not verify:
            outcomes = [_unenforced(o) for o in outcomes]
        return Results(mail_spf, helo_spf, tuple(signatures), _worst(outcomes), arc)

    def header(self, results: Results, *, mail_from: str, helo: str) -> bytes:
        if mail_from:
            clauses = [authresults.spf_clause(results.spf, "mailfrom", mail_from)]
        else:
            clauses = [authresults.spf_clause(results.helo, "helo", helo)]
        clauses += authresults.dkim_clauses(results.dkim)
        clauses.append(authresults.dmarc_clause(results.dmarc))
        clauses.append(authresults.arc_clause(results.arc))
        return authresults.header_field(self.settings.authserv_id, clauses)


async def _none_dkim() -> list[DKIMResult]:
    return []


async def _none_arc() -> ARCResult:
    return ARCResult("none")


def _unenforced(result: DMARCResult) -> DMARCResult:
    """A DMARC failure we could not fully establish (DKIM not verified) is never enforced."""
    if result.result != "fail":
        return result
    return DMARCResult(
        result.result, result.from_domain, result.policy, "none", result.policy_domain,
        "DKIM not verified (message too large); policy not applied",
    )  # fmt: skip


_SEVERITY = {"none": 0, "quarantine": 1, "reject": 2}


def _worst(outcomes: Sequence[DMARCResult]) -> DMARCResult:
    """With several From domains, the one whose failure weighs most decides."""

    def weight(r: DMARCResult) -> tuple[int, int]:
        failing = r.result in ("fail", "temperror")
        return (int(failing), _SEVERITY[r.disposition] if failing else 0)

    return max(outcomes, key=weight)


def _field(text: str) -> bytes:
    clean = re.sub(r"[\x00-\x1f\x7f]", "", text)
    return (clean + "\r\n").encode("utf-8", "replace") if ":" in clean else b""


def _shown(text: str, limit: int = 100) -> str:
    """Sender-controlled text for a reply line: printable ASCII only, bounded (the reply line
    must stay under RFC 5321 §4.5.3.1.5's 512 octets)."""
    return re.sub(r"[^\x20-\x7e]", "?", text)[:limit]


def refusal(results: Results, policy: DomainPolicy) -> tuple[Reply | None, bool]:
    """One domain's decision: a refusal (or None) and whether to quarantine."""
    d = results.dmarc
    if d.result == "fail" and d.disposition == "reject" and policy.dmarc_reject:
        return r.dmarc_rejected(_shown(d.from_domain), d.policy), False
    # deferred only when the answer could matter: a policy that is not p=none, or one that
    # could not be read at all (it might be p=reject)
    if d.result == "temperror" and policy.temperror == "defer" and (
        d.policy != "none" or not d.policy_domain
    ):
        return r.DMARC_TEMPERROR, False
    if policy.spf_reject and results.spf.result == "fail":
        explanation = _shown(results.spf.explanation or "", MAX_REPLY_TEXT)
        return r.spf_failed(_shown(results.spf.domain), explanation), False
    if policy.spf_reject and results.spf.result == "temperror" and policy.temperror == "defer":
        return r.SPF_TEMPERROR, False
    quarantine = d.result == "fail" and d.disposition == "quarantine"
    if d.result == "fail" and d.disposition == "reject" and not policy.dmarc_reject:
        quarantine = True  # not refused: the next best is the Junk folder
    return None, quarantine


def decide(results: Results, policies: Sequence[DomainPolicy]) -> tuple[Reply | None, bool]:
    """The message's decision over its recipients' policies: refused only when every policy
    refuses (the first refusal is the reply), quarantined when any policy says so."""
    if not policies:
        return None, False
    answers = [refusal(results, p) for p in policies]
    replies = [r for r, _ in answers]
    if all(reply is not None for reply in replies):
        return replies[0], False
    return None, any(q for _, q in answers)


def summary(results: Results) -> str:
    """The results in one log line: `spf=pass dkim=pass(example.com) dmarc=pass ...`."""
    sigs = ",".join(f"{s.result}({s.domain or '?'})" for s in results.dkim) or "none"
    d = results.dmarc
    dm = f"dmarc={d.result}"
    if d.result in ("fail", "temperror", "pass"):
        dm += f"(p={d.policy},dis={d.disposition})"
    return (f"spf={results.spf.result} helo_spf={results.helo.result} dkim={sigs} {dm} "
            f"header.from={d.from_domain or '-'} arc={results.arc.result}")  # fmt: skip
