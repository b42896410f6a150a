"""DKIM signatures: the RFC 8463 example vector, and what we sign verifies in dkimpy."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from mailhaven.signing import keys as keystore
from mailhaven.signing.canon import hash_body, parse_fields, relaxed_header, split_message
from mailhaven.signing.signer import (
    OVERSIGNED,
    header_hash_input,
    select_headers,
    sign_data,
    sign_message,
)

#: RFC 8463 Appendix A: the Ed25519 key (A.1), the signed message (A.3, its Ed25519 signature).
RFC8463_SEED = "nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A="
RFC8463_PUBLIC = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
RFC8463_SIGNED = (
    b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n"
    b" d=football.example.com; i=@football.example.com;\r\n"
    b" q=dns/txt; s=brisbane; t=1528637909; h=from : to :\r\n"
    b" subject : date : message-id : from : subject : date;\r\n"
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
    b" b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus\r\n"
    b" Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==\r\n"
    b"From: Joe SixPack <joe@football.example.com>\r\n"
    b"To: Suzie Q <suzie@shopping.example.net>\r\n"
    b"Subject: Is dinner ready?\r\n"
    b"Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n"
    b"Message-ID: <20030712040037.46341.5F8J@football.example.com>\r\n"
    b"\r\n"
    b"Hi.\r\n"
    b"\r\n"
    b"We lost the game.  Are you hungry yet?\r\n"
    b"\r\n"
    b"Joe.\r\n"
    b"\r\n"
)

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: lunch  \r\n\tat noon\r\n"
    b"Date: Fri, 04 Dec 2026 10:00:00 +0000\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"X-Mailer: test\r\n"
    b"\r\n"
    b"Hi Bob,  \r\n\r\nsee you.\r\n\r\n\r\n"
)


def rfc8463_key(tmp_path: Path) -> keystore.SigningKey:
    private = ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(RFC8463_SEED))
    return keystore.SigningKey("football.example.com", "brisbane", private, tmp_path / "k")


def test_rfc8463_vector_reproduced(tmp_path: Path) -> None:
    """Ed25519 is deterministic: with the RFC's key, our canonicalization of the RFC's header
    and our Ed25519-over-SHA-256 give the RFC's b= exactly, and our body hash its bh=."""
    key = rfc8463_key(tmp_path)
    assert key.public_value() == RFC8463_PUBLIC
    header, body = split_message(RFC8463_SIGNED)
    fields = parse_fields(header)
    signature, message_fields = fields[0], fields[1:]
    assert base64.b64encode(hash_body([body])) == b"2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8="
    names = [n.strip().decode() for n in re.search(rb"h=([^;]*);", signature.value.replace(
        b"\r\n", b"")).group(1).split(b":")]  # type: ignore[union-attr]
    emptied = re.sub(rb"b=[^;]*$", b"b=", signature.value)
    data = header_hash_input(message_fields, names) + relaxed_header(
        signature.name, emptied).removesuffix(b"\r\n")
    published = base64.b64decode(re.sub(rb"\s", b"", signature.value.rpartition(b"b=")[2]))
    assert sign_data(key, data) == published


def test_rfc8463_message_signed_by_us_verifies_in_dkimpy(tmp_path: Path) -> None:
    key = rfc8463_key(tmp_path)
    _, _, message = RFC8463_SIGNED.partition(b"Dw==\r\n")
    header, body = split_message(message)
    signed = sign_message([key], header, [body], now=1528637909) + message
    record = f"v=DKIM1; k=ed25519; p={RFC8463_PUBLIC}".encode()
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: record)


@pytest.fixture
def domain_keys(tmp_path: Path) -> list[keystore.SigningKey]:
    return [
        keystore.generate(tmp_path, "example.org", "rsa-1", "rsa"),
        keystore.generate(tmp_path, "example.org", "ed-1", "ed25519"),
    ]


def dns_for(keys: list[keystore.SigningKey]):  # type: ignore[no-untyped-def]
    records = {k.record_name: k.txt_value().encode() for k in keys}

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name.decode().rstrip("."))

    return lookup


def test_dual_signature_verifies_in_dkimpy(domain_keys: list[keystore.SigningKey]) -> None:
    header, body = split_message(MESSAGE)
    chunks = [body[i : i + 3] for i in range(0, len(body), 3)]
    signed = sign_message(domain_keys, header, chunks, now=1_796_000_000) + MESSAGE
    assert signed.count(b"DKIM-Signature:") == 2
    assert b"a=rsa-sha256" in signed and b"a=ed25519-sha256" in signed
    for index in (0, 1):
        assert dkim.DKIM(signed).verify(idx=index, dnsfunc=dns_for(domain_keys))


def test_oversigned_from_breaks_on_a_second_from(domain_keys: list[keystore.SigningKey]) -> None:
    header, body = split_message(MESSAGE)
    signed = sign_message(domain_keys[:1], header, [body], now=1_796_000_000) + MESSAGE
    forged = signed.replace(b"From: Alice", b"From: Mallory <m@evil.example>\r\nFrom: Alice")
    assert not dkim.verify(forged, dnsfunc=dns_for(domain_keys))
    added = signed.replace(b"X-Mailer: test", b"X-Mailer: test\r\nX-Spam: no")
    assert dkim.verify(added, dnsfunc=dns_for(domain_keys))  # unsigned fields may be added


def test_signed_header_set() -> None:
    fields = parse_fields(split_message(MESSAGE)[0])
    names = select_headers(fields)
    assert names.count("from") == 2 and "x-mailer" not in names
    assert all(n in names for n in OVERSIGNED)
    assert names.index("from") == 0


def test_bare_lf_message_signs_as_sent_with_crlf(domain_keys: list[keystore.SigningKey]) -> None:
    bare = MESSAGE.replace(b"\r\n", b"\n")
    header, body = split_message(bare)
    signature = sign_message(domain_keys, header, [body], now=1_796_000_000)
    assert dkim.verify(signature + MESSAGE, dnsfunc=dns_for(domain_keys))


def test_message_without_from_or_body(domain_keys: list[keystore.SigningKey]) -> None:
    """A header-only message still gets a signature (From oversigned: none may be added
    later), and its empty body hashes as nothing (RFC 6376 §3.4.4)."""
    signature = sign_message(domain_keys[:1], b"Subject: x\r\n", [], now=1_796_000_000)
    assert b"h=subject:from:" in signature
    assert b"bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=;" in signature
