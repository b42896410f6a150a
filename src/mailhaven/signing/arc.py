"""ARC sealing (RFC 8617) of mail we forward: one new ARC set on top of the header.

In: the message's header block (with the `Authentication-Results:` our MX added), its body in
chunks, an RSA `SigningKey` of our domain, our authserv-id. Out: the three fields of the new
set, `ARC-Seal`, `ARC-Message-Signature`, `ARC-Authentication-Results`, or None when no set
may be added (RFC 8617 §4.2.1: at most 50 sets; a chain that already failed is not extended).
Pure: no I/O; the time comes in as `now`.

The AAR copies the results of the `Authentication-Results:` field carrying our authserv-id
(RFC 8617 §4.1.1); when there is none (the inbound checks are off) it copies the topmost such
field, and with none at all it says `none`. `cv=` is `none` for the first set; for a later one
it is what our checks said about the chain (`arc=pass` in our results), otherwise `fail`, and
a failed chain's seal covers only its own set (§5.1.2).

Why our own and not dkimpy's `arc_sign`: the same reason as `signer` (pure-Python RSA, two
signatures per set, each holding the interpreter); dkimpy's `arc_verify` checks ours in the
tests.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Sequence

from mailhaven.signing.canon import BodyHasher, Field, parse_fields, relaxed_header
from mailhaven.signing.keys import SigningKey
from mailhaven.signing.signer import SIGNED, fold_b64, select_headers, sign_data, signature_field

#: RFC 8617 §4.2.1: i= runs from 1 to 50.
MAX_INSTANCE = 50
ARC_FIELDS = (b"arc-seal", b"arc-message-signature", b"arc-authentication-results")
_INSTANCE = re.compile(rb"(?:^|;)\s*i\s*=\s*(\d{1,3})\s*(?:;|$)")
_ARC_RESULT = re.compile(rb"(?:^|;)\s*arc\s*=\s*([a-z]+)", re.IGNORECASE)


def instance_of(field: Field) -> int | None:
    match = _INSTANCE.search(field.value.replace(b"\r\n", b""))
    return int(match.group(1)) if match else None


def authserv_id(value: bytes) -> bytes:
    """The authserv-id of an Authentication-Results value (RFC 8601 §2.2), lower case."""
    return value.split(b";", 1)[0].strip().split()[0].lower() if value.strip() else b""


def seal(
    key: SigningKey,
    header: bytes,
    body_chunks: Iterable[bytes],
    *,
    server_id: str,
    now: int,
) -> bytes | None:
    """The new ARC set's fields (AS, AMS, AAR, top to bottom), or None (see module doc).
    The key must be RSA: RFC 8617 §4.1.3 defines no other algorithm."""
    if key.algorithm != "rsa":
        raise ValueError(f"ARC seals with an RSA key; {key.path} is {key.algorithm}")
    fields = parse_fields(header)
    sets: dict[int, dict[bytes, Field]] = {}
    for f in fields:
        if f.key in ARC_FIELDS and (i := instance_of(f)) is not None:
            sets.setdefault(i, {})[f.key] = f
    instance = max(sets, default=0) + 1
    if instance > MAX_INSTANCE:
        return None
    results = _our_results(fields, server_id.lower().encode())
    complete = all(len(sets.get(i, {})) == len(ARC_FIELDS) for i in range(1, instance))
    if instance == 1:
        cv = "none"
    else:
        said = _ARC_RESULT.search(results)
        if not complete or any(_cv(s) == b"fail" for s in sets.values()):
            return None  # a broken or failed chain stays as it is
        cv = "pass" if said and said.group(1).lower() == b"pass" else "fail"
    aar = b"ARC-Authentication-Results: i=%d; " % instance + results + b"\r\n"
    hasher = BodyHasher()
    for chunk in body_chunks:
        hasher.update(chunk)
    names = select_headers(fields, SIGNED)
    ams = signature_field(
        key, fields, hasher.digest(), names, now=now,
        header_name="ARC-Message-Signature", leading_tags=f"i={instance}; ",
    )
    prefix = (
        f"i={instance}; a=rsa-sha256; cv={cv}; d={key.domain}; s={key.selector};\r\n"
        f"\tt={now}; b="
    )
    chain = b""
    if cv != "fail":
        for i in range(1, instance):
            for name in reversed(ARC_FIELDS):  # AAR, AMS, AS
                f = sets[i][name]
                chain += relaxed_header(f.name, f.value)
    own = b"".join(relaxed_header(*_split(line)) for line in (aar, ams))
    unsigned = relaxed_header(b"ARC-Seal", b" " + prefix.encode()).removesuffix(b"\r\n")
    b = base64.b64encode(sign_data(key, chain + own + unsigned)).decode("ascii")
    arc_seal = f"ARC-Seal: {prefix}{fold_b64(b)}\r\n".encode("ascii")
    return arc_seal + ams + aar


def _split(line: bytes) -> tuple[bytes, bytes]:
    name, _, value = line.removesuffix(b"\r\n").partition(b":")
    return name, value


def _cv(fields: dict[bytes, Field]) -> bytes | None:
    seal_field = fields.get(b"arc-seal")
    if seal_field is None:
        return None
    match = re.search(rb"cv\s*=\s*([a-z]+)", seal_field.value, re.IGNORECASE)
    return match.group(1).lower() if match else None


def _our_results(fields: Sequence[Field], server_id: bytes) -> bytes:
    """The results to copy into the AAR: ours, else the topmost present, else `none`."""
    results = [f for f in fields if f.key == b"authentication-results"]
    ours = [f for f in results if authserv_id(f.value) == server_id]
    chosen = ours[0] if ours else (results[0] if results else None)
    if chosen is None:
        return server_id + b"; none"
    return re.sub(rb"\r?\n[ \t]+", b" ", chosen.value).strip()
