"""DKIM-Signature fields for a message (RFC 6376 §5, RFC 8463), relaxed/relaxed, SHA-256.

In: the message's header block and its body in chunks, and the `SigningKey`s of the signing
domain. Out: the `DKIM-Signature:` fields to put on top of the header, one per key (RSA and
Ed25519 side by side is RFC 8463 §6's dual signing). Pure: no I/O, the time comes in as `now`.

Why our own and not dkimpy's `sign`: dkimpy does RSA in pure Python, many times slower than
`cryptography`'s OpenSSL and holding the interpreter all the while; and dkimpy
wants the whole message as one bytes object, where the body hash here is fed in chunks. dkimpy
stays the reference in the tests: what we sign must verify there, in OpenDKIM and in rspamd.

Signed header fields (`h=`): each instance of the fields in `SIGNED`, and the ones in
`OVERSIGNED` once more than they occur (RFC 6376 §8.15: a signed "missing" instance means none
may be added later, so no second `From:` or `Subject:` can be slipped in by a relay).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding

from mailhaven.signing.canon import BodyHasher, Field, parse_fields, relaxed_header
from mailhaven.signing.keys import SigningKey

#: RFC 6376 §5.4.1's list, trimmed to what a receiver shows or acts on, plus the list fields
#: (RFC 8058 one-click unsubscribe must be signed).
SIGNED = (
    "from", "reply-to", "subject", "date", "to", "cc", "message-id", "in-reply-to",
    "references", "mime-version", "content-type", "content-transfer-encoding",
    "content-language", "list-id", "list-unsubscribe", "list-unsubscribe-post", "sender",
)
#: Signed once more than they occur (see module docstring): what a reader takes as the author,
#: the topic and the audience.
OVERSIGNED = ("from", "reply-to", "subject", "to", "cc")
#: Fold the b= value into lines of this many characters (RFC 5322 §2.1.1 wants < 78).
B64_LINE = 64


def select_headers(
    fields: Sequence[Field], signed: Iterable[str] = SIGNED, oversigned: Iterable[str] = OVERSIGNED
) -> list[str]:
    """The `h=` list: every present instance of `signed` names, then the oversigned extras."""
    counts: dict[str, int] = {}
    for f in fields:
        name = f.key.decode("ascii", "replace")
        counts[name] = counts.get(name, 0) + 1
    names: list[str] = []
    for name in signed:
        names += [name] * counts.get(name, 0)
    names += [n for n in oversigned if n in signed or counts.get(n)]
    return names


def header_hash_input(fields: Sequence[Field], names: Sequence[str]) -> bytes:
    """The selected fields, relaxed, in `h=` order; repeated names take instances from the
    bottom up, a name with no instance left contributes nothing (RFC 6376 §5.4.2)."""
    by_name: dict[str, list[Field]] = {}
    for f in fields:
        by_name.setdefault(f.key.decode("ascii", "replace"), []).append(f)
    out = []
    for name in names:
        stack = by_name.get(name.lower())
        if stack:
            f = stack.pop()
            out.append(relaxed_header(f.name, f.value))
    return b"".join(out)


def sign_data(key: SigningKey, data: bytes) -> bytes:
    """RSASSA-PKCS1-v1_5 with SHA-256 over the data (RFC 6376 §3.3.1), or Ed25519 over the
    data's SHA-256 (RFC 8463 §3: PureEdDSA signs the hash, not the data)."""
    private = key.key
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return private.sign(hashlib.sha256(data).digest())
    return private.sign(data, padding.PKCS1v15(), hashes.SHA256())


def sign_all(keys: Sequence[SigningKey], datas: Sequence[bytes]) -> list[bytes]:
    """`sign_data` for each key and its data: a message's signatures as one job."""
    return [sign_data(k, d) for k, d in zip(keys, datas, strict=True)]


def fold_names(names: Sequence[str], per_line: int = 6) -> str:
    """`h=` folded after every few names (FWS may follow a colon, RFC 6376 §3.5)."""
    groups = [":".join(names[i : i + per_line]) for i in range(0, len(names), per_line)]
    return ":\r\n\t  ".join(groups)


def fold_b64(value: str, indent: str = "\t") -> str:
    return f"\r\n{indent}".join(value[i : i + B64_LINE] for i in range(0, len(value), B64_LINE))


def signature_field(
    key: SigningKey,
    fields: Sequence[Field],
    body_hash: bytes,
    names: Sequence[str],
    *,
    now: int,
    header_name: str = "DKIM-Signature",
    leading_tags: str = "v=1; ",
) -> bytes:
    """One complete signature field (name, value, CRLF). ARC's AMS reuses it with its own
    name and an `i=` instead of `v=` (RFC 8617 §4.1.2)."""
    prefix, data = signature_request(
        key, fields, body_hash, names, now=now, header_name=header_name,
        leading_tags=leading_tags,
    )
    return finish_field(header_name, prefix, sign_data(key, data))


def signature_request(
    key: SigningKey,
    fields: Sequence[Field],
    body_hash: bytes,
    names: Sequence[str],
    *,
    now: int,
    header_name: str = "DKIM-Signature",
    leading_tags: str = "v=1; ",
    signed_headers: bytes | None = None,
) -> tuple[str, bytes]:
    """The field's text up to `b=` and the data to sign (RFC 6376 §3.7), so the private-key
    operation can happen elsewhere (`helper`) and `finish_field` completes it.
    `signed_headers`: `header_hash_input(fields, names)` when the caller has it already (it is
    the same for every key of a message)."""
    prefix = (
        f"{leading_tags}a={key.dkim_algorithm}; c=relaxed/relaxed; d={key.domain};"
        f" s={key.selector};\r\n\tt={now}; h={fold_names(names)};\r\n"
        f"\tbh={base64.b64encode(body_hash).decode('ascii')};\r\n\tb="
    )
    unsigned = relaxed_header(header_name.encode(), b" " + prefix.encode()).removesuffix(b"\r\n")
    if signed_headers is None:
        signed_headers = header_hash_input(fields, names)
    return prefix, signed_headers + unsigned


def finish_field(header_name: str, prefix: str, signature: bytes) -> bytes:
    b = base64.b64encode(signature).decode("ascii")
    return f"{header_name}: {prefix}{fold_b64(b)}\r\n".encode("ascii")


def sign_message(
    keys: Sequence[SigningKey],
    header: bytes,
    body_chunks: Iterable[bytes],
    *,
    now: int,
    signed: Iterable[str] = SIGNED,
) -> bytes:
    """`DKIM-Signature:` fields (one per key, in key order) for the message."""
    hasher = BodyHasher()
    for chunk in body_chunks:
        hasher.update(chunk)
    body_hash = hasher.digest()
    fields = parse_fields(header)
    names = select_headers(fields, tuple(signed))
    return b"".join(signature_field(k, fields, body_hash, names, now=now) for k in keys)
