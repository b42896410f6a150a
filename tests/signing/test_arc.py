"""ARC sets we add verify in dkimpy's arc_verify, alone and after another forwarder's."""

from __future__ import annotations

from pathlib import Path

import dkim
import pytest

from mailhaven.signing import arc
from mailhaven.signing import keys as keystore
from mailhaven.signing.canon import split_message

MESSAGE = (
    b"Authentication-Results: mx.fwd.example; spf=pass smtp.mailfrom=alice@example.org;\r\n"
    b"  dkim=pass header.d=example.org; dmarc=pass header.from=example.org\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: list@fwd.example\r\n"
    b"Subject: hello\r\n"
    b"Date: Fri, 04 Dec 2026 10:00:00 +0000\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"\r\n"
    b"body\r\n"
)
NOW = 1_796_000_000


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, keystore.SigningKey]:
    return {d: keystore.generate(tmp_path, d, "arc", "rsa") for d in ("fwd.example", "b.example")}


def dns_for(keys: dict[str, keystore.SigningKey]):  # type: ignore[no-untyped-def]
    records = {k.record_name: k.txt_value().encode() for k in keys.values()}
    return lambda name, timeout=5: records.get(name.decode().rstrip("."))


def seal(key: keystore.SigningKey, message: bytes, server_id: str) -> bytes | None:
    header, body = split_message(message)
    return arc.seal(key, header, [body], server_id=server_id, now=NOW)


def test_first_set_verifies(keys: dict[str, keystore.SigningKey]) -> None:
    added = seal(keys["fwd.example"], MESSAGE, "mx.fwd.example")
    assert added is not None
    assert added.startswith(b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=fwd.example;")
    assert b"ARC-Authentication-Results: i=1; mx.fwd.example; spf=pass" in added
    result, sets, _why = dkim.arc_verify(added + MESSAGE, dnsfunc=dns_for(keys))
    assert result == b"pass" and sets[0]["ams-valid"] and sets[0]["as-valid"]


def test_second_forwarder_extends_the_chain(keys: dict[str, keystore.SigningKey]) -> None:
    first = seal(keys["fwd.example"], MESSAGE, "mx.fwd.example")
    assert first is not None
    hop = b"Authentication-Results: mx.b.example; arc=pass smtp.remote-ip=192.0.2.1\r\n"
    relayed = hop + first + MESSAGE
    second = seal(keys["b.example"], relayed, "mx.b.example")
    assert second is not None and b"i=2; a=rsa-sha256; cv=pass" in second
    result, sets, _ = dkim.arc_verify(second + relayed, dnsfunc=dns_for(keys))
    assert result == b"pass" and len(sets) == 2


def test_without_our_results(keys: dict[str, keystore.SigningKey]) -> None:
    """No A-R with our authserv-id: the topmost A-R is copied; none at all: `none`."""
    added = seal(keys["b.example"], MESSAGE, "mx.b.example")
    assert added is not None and b"i=1; mx.fwd.example; spf=pass" in added
    bare = MESSAGE.split(b"From:", 1)[1]
    added = seal(keys["b.example"], b"From:" + bare, "mx.b.example")
    assert added is not None and b"ARC-Authentication-Results: i=1; mx.b.example; none" in added
    result, _, _ = dkim.arc_verify(added + b"From:" + bare, dnsfunc=dns_for(keys))
    assert result == b"pass"


def test_limits_and_broken_chains(keys: dict[str, keystore.SigningKey]) -> None:
    key = keys["b.example"]
    fifty = b"".join(
        b"ARC-Seal: i=%d; cv=pass; b=x\r\nARC-Message-Signature: i=%d; b=x\r\n"
        b"ARC-Authentication-Results: i=%d; x; none\r\n" % (i, i, i) for i in range(1, 51)
    )
    assert seal(key, fifty + MESSAGE, "mx.b.example") is None  # RFC 8617: i=50 is the last
    failed = b"ARC-Seal: i=1; cv=fail; b=x\r\nARC-Message-Signature: i=1; b=x\r\n" \
        b"ARC-Authentication-Results: i=1; x; none\r\n"
    assert seal(key, failed + MESSAGE, "mx.b.example") is None
    partial = b"ARC-Seal: i=1; cv=none; b=x\r\n"  # a set missing its AMS and AAR
    assert seal(key, partial + MESSAGE, "mx.b.example") is None


def test_unverified_chain_is_sealed_as_failed(keys: dict[str, keystore.SigningKey]) -> None:
    first = seal(keys["fwd.example"], MESSAGE, "mx.fwd.example")
    assert first is not None
    relayed = b"Authentication-Results: mx.b.example; arc=fail\r\n" + first + MESSAGE
    second = seal(keys["b.example"], relayed, "mx.b.example")
    assert second is not None and b"cv=fail" in second
