"""Interoperability: what mailhaven signs verifies in rspamd's DKIM and ARC checks (Debian's).

A private rspamd (`tests.support.rspamd_scan`: HTTP scanning, DKIM and ARC checks on, its DNS
pointed at a `tests.support.dns_server` on loopback that serves our keys' TXT records) scans
messages signed by `mailhaven.signing` -- RSA-2048 alone, Ed25519 alone (RFC 8463), both (dual
signing, what the server does by default with two keys; once through intake's signing hook as
the server runs it, where OpenDKIM and dkimpy check it too), and an ARC set from
`mailhaven.signing.arc`. Shown: rspamd reports `R_DKIM_ALLOW` (and `ARC_ALLOW`) for them, and
`R_DKIM_REJECT` (`ARC_REJECT`) once a signed part is changed: the body, a signed header field,
the From: field; a From: field added on top (oversigned) gets no `R_DKIM_ALLOW`, and a key
that is not published `R_DKIM_PERMFAIL`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
from tests.support import rspamd
from tests.support.dkim_peers import dkimpy_dns, opendkim_verify
from tests.support.dns_server import DNSServer
from tests.support.rspamd_scan import RspamdScanner

from mailhaven.intake.cleanup import Intake, Queued
from mailhaven.proto.envelope import Envelope, RecipientSpec
from mailhaven.scheduler.active import ActiveQueue
from mailhaven.signing import arc
from mailhaven.signing import keys as keystore
from mailhaven.signing.canon import split_message
from mailhaven.signing.outbound import Outbound
from mailhaven.signing.signer import sign_message
from mailhaven.spool import Spool

pytestmark = pytest.mark.e2e

NOW = 1_796_400_000  # 2026-12-04: rspamd checks x= against its clock; we set none
MESSAGE = (
    b"Received: from client.example.org (client.example.org [192.0.2.25])\r\n"
    b"\tby mx.example.org (mailhaven) with ESMTPSA id 4QABCDEF; Fri, 4 Dec 2026 12:00:00 +0000\r\n"
    b"From: Alice Example <alice@example.org>\r\n"
    b"To: Bob <bob@dest.test>,\r\n  Carol <carol@dest.test>\r\n"
    b"Subject:   DKIM   interop\t with rspamd \r\n"
    b"Date: Fri, 04 Dec 2026 12:00:00 +0000\r\n"
    b"Message-ID: <interop.1@example.org>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello Bob,  \r\n\r\nwhitespace \t runs, trailing blanks \t\r\nand empty lines at the end"
    b"\r\n\r\n\r\n"
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, keystore.SigningKey]:
    folder = tmp_path_factory.mktemp("dkim-keys")
    return {
        "rsa": keystore.generate(folder, "example.org", "rsa-1", "rsa"),
        "ed25519": keystore.generate(folder, "example.org", "ed-1", "ed25519"),
        # a key whose record is never published
        "unpublished": keystore.generate(folder, "example.org", "gone", "rsa"),
    }


@pytest.fixture(scope="module")
def dns(keys: dict[str, keystore.SigningKey]) -> Iterator[DNSServer]:
    published = [keys["rsa"], keys["ed25519"]]
    records: dict[str, dict[str, list[object]]] = {
        k.record_name: {"TXT": [k.txt_value()]} for k in published
    }
    with DNSServer(records) as server:
        yield server


@pytest.fixture(scope="module")
def scanner(dns: DNSServer) -> Iterator[RspamdScanner]:
    reason = rspamd.skip_reason()
    if reason:
        pytest.skip(reason)
    with RspamdScanner(dns.address, enable=("dkim", "arc")) as instance:
        yield instance


def signed(message: bytes, *keys: keystore.SigningKey) -> bytes:
    head, body = split_message(message)
    return sign_message(keys, head, [body], now=NOW) + message


def dkim_symbols(scanner: RspamdScanner, message: bytes) -> dict[str, list[str]]:
    symbols = scanner.scan(message).get("symbols", {})
    return {name: list(value.get("options", [])) for name, value in symbols.items()
            if "DKIM" in name or name.startswith("ARC_")}


@pytest.mark.parametrize("which", [("rsa",), ("ed25519",), ("rsa", "ed25519")])
def test_signed_mail_is_allowed(
    scanner: RspamdScanner, keys: dict[str, keystore.SigningKey], which: tuple[str, ...]
) -> None:
    chosen = [keys[w] for w in which]
    found = dkim_symbols(scanner, signed(MESSAGE, *chosen))
    # rspamd names each signature that verified: one per key
    assert sorted(found.get("R_DKIM_ALLOW", [])) == sorted(
        f"example.org:s={k.selector}" for k in chosen), found
    assert "R_DKIM_REJECT" not in found, found


@pytest.mark.parametrize("which", ["rsa", "ed25519"])
@pytest.mark.parametrize("tamper", [
    (b"Hello Bob,", b"Hello Eve,"),  # the body
    (b"DKIM   interop", b"DKIM   intercept"),  # a signed header field
    (b"From: Alice Example <alice@", b"From: Mallory <alice@"),  # the oversigned From:
])
def test_tampered_mail_is_rejected(
    scanner: RspamdScanner, keys: dict[str, keystore.SigningKey], which: str,
    tamper: tuple[bytes, bytes],
) -> None:
    message = signed(MESSAGE, keys[which])
    assert tamper[0] in message
    found = dkim_symbols(scanner, message.replace(tamper[0], tamper[1], 1))
    assert "R_DKIM_REJECT" in found, found
    assert "R_DKIM_ALLOW" not in found, found


def test_added_from_field_breaks_the_oversigned_signature(
    scanner: RspamdScanner, keys: dict[str, keystore.SigningKey]
) -> None:
    message = b"From: Mallory <ceo@example.org>\r\n" + signed(MESSAGE, keys["rsa"])
    found = dkim_symbols(scanner, message)
    assert "R_DKIM_ALLOW" not in found, found


def test_unpublished_key_is_not_allowed(
    scanner: RspamdScanner, keys: dict[str, keystore.SigningKey]
) -> None:
    found = dkim_symbols(scanner, signed(MESSAGE, keys["unpublished"]))
    assert found.get("R_DKIM_PERMFAIL") == ["example.org:s=gone"], found
    assert "R_DKIM_ALLOW" not in found, found


async def test_mail_signed_through_intake_is_allowed(
    scanner: RspamdScanner, dns: DNSServer, keys: dict[str, keystore.SigningKey], tmp_path: Path
) -> None:
    """The server's own path: intake's hook signs with both keys (the loop hashes, the signing
    thread signs) before the commit; the stored message is what goes out. OpenDKIM and dkimpy
    agree with rspamd."""
    spool = Spool(tmp_path / "q", inline_limit=4096)
    spool.open()
    hook = Outbound(keys={"example.org": [keys["rsa"], keys["ed25519"]]}, arc_key=None,
                    srs=None, server_id="mx.example.org",
                    is_local_domain=lambda d: d == "example.org", clock=lambda: NOW)
    intake = Intake(ActiveQueue(spool, wake=lambda: None), hostname="mx.example.org",
                    expand=lambda address: [address], clock=lambda: NOW, outbound=hook)
    try:
        writer = spool.new_message()
        writer.write(MESSAGE)
        outcome = await intake.submit(writer, Envelope(
            "alice@example.org", (RecipientSpec("bob@dest.test"),), auth_user="alice"))
        assert isinstance(outcome, Queued)
        stored = await spool.load(outcome.queue_id)
        assert stored is not None
        with stored.open() as f:
            message = f.read()
    finally:
        await hook.close()
        spool.close()
    found = dkim_symbols(scanner, message)
    assert sorted(found.get("R_DKIM_ALLOW", [])) == ["example.org:s=ed-1",
                                                     "example.org:s=rsa-1"], found
    for index in (0, 1):
        assert dkim.DKIM(message).verify(idx=index, dnsfunc=dkimpy_dns(dns)), index
    verdict = opendkim_verify(message, dns, tmp_path / "opendkim")  # the first: RSA
    assert "s=rsa-1" in verdict and "d=example.org" in verdict and "succeeded" in verdict, verdict


def test_arc_set_is_allowed(scanner: RspamdScanner, keys: dict[str, keystore.SigningKey]) -> None:
    received = (
        b"Authentication-Results: mx.example.org; spf=pass smtp.mailfrom=alice@example.org;\r\n"
        b"\tdkim=pass header.d=example.org; dmarc=pass header.from=example.org\r\n" + MESSAGE
    )
    head, body = split_message(received)
    arc_set = arc.seal(keys["rsa"], head, [body], server_id="mx.example.org", now=NOW)
    assert arc_set is not None
    found = dkim_symbols(scanner, arc_set + received)
    assert "ARC_ALLOW" in found, found
    tampered = (arc_set + received).replace(b"Hello Bob,", b"Hello Eve,")
    found = dkim_symbols(scanner, tampered)
    assert "ARC_REJECT" in found, found

