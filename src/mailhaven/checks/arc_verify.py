"""ARC chain validation (RFC 8617 §5.2) with dkimpy, keys prefetched through our resolver.

In: the message as received and a `Lookup`. Out: an `ARCResult` (`none`: no ARC sets; `pass`:
the chain validates; `fail`: it does not, with the reason), the value that goes into
`Authentication-Results: ... arc=` (RFC 8617 §8.2). A chain that validates tells us what the
earlier hops found (their ARC-Authentication-Results); trusting particular sealers to override a
DMARC failure is local policy we do not apply yet.

dkimpy has no async ARC API, so, as for DKIM, the keys named by the ARC-Seal and
ARC-Message-Signature fields (`s=`/`d=`) are fetched concurrently first and dkimpy reads them
from a dict (`dkim_verify.dnsfunc_for`); a key whose lookup failed temporarily fails the chain
with that reason.

Limits: RFC 8617 §4.2.1 allows 50 ARC sets; we validate at most `MAX_ARC_SETS` (a chain longer
than that is `fail`), so a hostile message costs at most twice that many key lookups.

SECURITY: all ARC fields are attacker-controlled until validated; dkimpy parses them and any
exception becomes `fail`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import dkim

from mailhaven.checks import dkim_verify
from mailhaven.checks.dkim_verify import (
    QUIET_LOGGER,
    Lookup,
    dnsfunc_for,
    fetch_keys,
    header_fields,
    parse_signatures,
    run_cpu,
    short_reason,
)
from mailhaven.net.dns import DNSAnswer, DNSError

Result = Literal["none", "pass", "fail"]

#: ARC sets we validate (RFC 8617 §4.2.1 caps chains at 50; real ones have a handful).
MAX_ARC_SETS = 10
#: Where to look for an ARC-Seal before parsing the message (header blocks are far smaller).
HEADER_SCAN = dkim_verify.HEADER_SCAN


@dataclass(frozen=True, slots=True)
class ARCResult:
    result: Result
    #: the highest instance (i=) seen; 0 without ARC
    instances: int = 0
    reason: str = ""


async def verify(message: bytes, lookup: Lookup) -> ARCResult:
    if b"arc-seal" not in message[:HEADER_SCAN].lower():
        return ARCResult("none")  # most mail: no need to parse the message a second time
    headers = header_fields(message)
    seals = [name for name, _ in headers if name.lower() == b"arc-seal"]
    if not seals:
        return ARCResult("none")
    if len(seals) > MAX_ARC_SETS:
        return ARCResult("fail", len(seals), f"more than {MAX_ARC_SETS} ARC sets")
    fields = parse_signatures(headers, b"arc-seal", MAX_ARC_SETS) + parse_signatures(
        headers, b"arc-message-signature", MAX_ARC_SETS
    )
    keys = await fetch_keys([f.key for f in fields], lookup)
    failed = [name for name, answer in keys.items() if isinstance(answer, DNSError)]
    if failed:
        return ARCResult("fail", len(seals), f"key lookup for {failed[0]} failed temporarily")
    return await run_cpu(validate_with_keys, message, keys, len(seals), size=len(message))


def validate_with_keys(message: bytes, keys: Mapping[str, DNSAnswer], sets: int) -> ARCResult:
    """The CPU part of `verify`, with the keys already fetched (any thread or process)."""
    try:
        parsed = dkim.ARC(message, logger=QUIET_LOGGER)
        cv, _, reason = parsed.verify(dnsfunc=dnsfunc_for(keys))
    except Exception as err:  # hostile ARC fields
        return ARCResult("fail", sets, f"cannot validate: {short_reason(err)}")
    if cv == dkim.CV_Pass:
        return ARCResult("pass", sets)
    if cv == dkim.CV_None:
        return ARCResult("none", sets, str(reason))
    return ARCResult("fail", sets, short_reason(Exception(reason)))
