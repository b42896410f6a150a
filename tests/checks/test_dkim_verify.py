"""checks.dkim_verify: RFC 8463's example, OpenDKIM's signatures, and hostile signatures."""

from __future__ import annotations

import base64
import shutil
import subprocess
import time
from pathlib import Path

import dkim
import nacl.signing
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailhaven.checks import dkim_verify
from mailhaven.net.dns import DNSAnswer, DNSError, NoRecords, Records

DATA = Path(__file__).parent / "data"
MESSAGE = (
    b"From: Alice <alice@example.test>\r\nTo: bob@mx.test\r\nSubject: hello\r\n"
    b"Date: Fri, 04 Dec 2026 12:00:00 +0000\r\nMessage-ID: <1@example.test>\r\n\r\n"
    b"Hello Bob.\r\n"
)


class Keys:
    """A zone of DKIM key records: {name: text}; names in `broken` SERVFAIL."""

    def __init__(self, records: dict[str, str], broken: set[str] | None = None) -> None:
        self.records = records
        self.broken = broken or set()
        self.asked: list[str] = []

    async def lookup(self, name: str, rdtype: str) -> DNSAnswer:
        self.asked.append(name)
        if name in self.broken:
            return DNSError("server failure")
        if name in self.records:
            return Records((self.records[name],), 300)
        return NoRecords(True)


def sign(message: bytes, pem: bytes, selector: bytes = b"sel", domain: bytes = b"example.test",
         **kwargs: object) -> bytes:  # fmt: skip
    return bytes(dkim.sign(message, selector, domain, pem, canonicalize=(b"relaxed", b"relaxed"),
                           **kwargs)) + message  # fmt: skip


async def test_the_rfc8463_example_verifies_both_signatures() -> None:
    """RFC 8463 Appendix A: an Ed25519 and an RSA signature over the same message."""
    keys = Keys({
        "brisbane._domainkey.football.example.com":
            "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=",
        "test._domainkey.football.example.com":
            "v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWRiGs5V6NpP3idY6Wk08a5qhdR6wy5bdOKb2jLQiY/J16JYi0Qvx/byYzCNb3W91y3FutACDfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqMKrM3rG4hstT5QjvHO9PzoxZyVYLzBfO2EeC3Ip3G+2kryOTIKT+l/K4w3QIDAQAB",
    })  # fmt: skip
    message = (DATA / "rfc8463-a3.eml").read_bytes()
    results = await dkim_verify.verify(message, keys)
    assert [(r.result, r.algorithm) for r in results] == [
        ("pass", "ed25519-sha256"), ("pass", "rsa-sha256")
    ]
    assert results[0].domain == "football.example.com" and results[0].b.startswith("/gCrinpc")
    tampered = message.replace(b"Are you hungry", b"Are you thirsty")
    assert {r.result for r in await dkim_verify.verify(tampered, keys)} == {"fail"}


async def test_rsa_and_ed25519_signatures_made_by_dkimpy(dkim_key: tuple[bytes, str]) -> None:
    pem, record = dkim_key
    seed = nacl.signing.SigningKey.generate()
    ed_record = "v=DKIM1; k=ed25519; p=" + base64.b64encode(bytes(seed.verify_key)).decode()
    signed = sign(MESSAGE, pem)
    signed = sign(signed, base64.b64encode(bytes(seed)), selector=b"ed",
                  signature_algorithm=b"ed25519-sha256")  # fmt: skip
    keys = Keys({"sel._domainkey.example.test": record, "ed._domainkey.example.test": ed_record})
    results = await dkim_verify.verify(signed, keys)
    assert [r.result for r in results] == ["pass", "pass"]


@pytest.mark.skipif(shutil.which("opendkim-testmsg") is None, reason="opendkim-tools missing")
async def test_a_message_signed_by_opendkim_verifies(
    dkim_key: tuple[bytes, str], tmp_path: Path
) -> None:
    pem, record = dkim_key
    keyfile = tmp_path / "sel.private"
    keyfile.write_bytes(pem)
    done = subprocess.run(
        ["opendkim-testmsg", "-C", "-d", "example.test", "-s", "odk", "-k", str(keyfile),
         "-t", str(tmp_path)],
        input=MESSAGE, capture_output=True, timeout=30, check=True,
    )  # fmt: skip
    signed = done.stdout
    assert signed.startswith(b"DKIM-Signature:")
    keys = Keys({"odk._domainkey.example.test": record})
    results = await dkim_verify.verify(signed, keys)
    assert [(r.result, r.domain, r.selector) for r in results] == [
        ("pass", "example.test", "odk")
    ]
    bad = await dkim_verify.verify(signed.replace(b"Hello Bob", b"Hello Eve"), keys)
    assert bad[0].result == "fail"


async def test_key_problems_have_defined_results(dkim_key: tuple[bytes, str]) -> None:
    pem, _ = dkim_key
    signed = sign(MESSAGE, pem)
    name = "sel._domainkey.example.test"
    cases = {
        "permerror": [Keys({}), Keys({name: "v=DKIM1; k=rsa; p=bm90IGEga2V5"}),
                      Keys({name: "v=DKIM1; p="}), Keys({name: "this is no key at all"}),
                      Keys({name: "v=DKIM1; k=ed25519; p=c2hvcnQ="}),
                      Keys({name: "v=DKIM1; k=dsa; p=AAAA"})],
        "temperror": [Keys({}, broken={name})],
    }  # fmt: skip
    for expected, zones in cases.items():
        for keys in zones:
            (result,) = await dkim_verify.verify(signed, keys)
            assert result.result == expected, (keys.records, result)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing")
async def test_a_short_rsa_key_fails() -> None:
    """RFC 8301 §3.2: keys under 1024 bits are refused (cryptography will not make one)."""
    pem = subprocess.run(["openssl", "genrsa", "512"], capture_output=True, check=True,
                         timeout=30).stdout  # fmt: skip
    key = serialization.load_pem_private_key(pem, None)
    assert isinstance(key, rsa.RSAPrivateKey)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())  # fmt: skip
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)  # fmt: skip
    signed = sign(MESSAGE, pem)
    keys = Keys({"sel._domainkey.example.test": f"k=rsa; p={base64.b64encode(der).decode()}"})
    (result,) = await dkim_verify.verify(signed, keys)
    assert result.result == "permerror" and "small" in result.reason


@pytest.mark.parametrize("field", [
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=sel; h=from; bh=AAAA; b=AAAA; b=BBBB",
    b"DKIM-Signature: garbage without tags",
    b"DKIM-Signature: v=1; a=rsa-sha512; d=example.test; s=sel; h=from; bh=AAAA; b=AAAA",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=sel; h=from; bh=AAAA; b=!!!!",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=exa mple..test; s=s\xffl; h=from; bh=AAAA; b=AAAA",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=sel; bh=AAAA; b=AAAA",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=sel; h=from; bh=AAAA; b=AAAA; l="
    + b"9" * 70,
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=sel; h=from; bh=AAAA; b=AAAA; t=99999999999",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=sel; h=from; bh=AAAA; b=AAAA; i=x@evil.test",
    b"DKIM-Signature: ;;;===;;;",
    b"DKIM-Signature:",
])  # fmt: skip
async def test_malformed_signatures_get_a_result_not_an_exception(
    field: bytes, dkim_key: tuple[bytes, str]
) -> None:
    _, record = dkim_key
    keys = Keys({"sel._domainkey.example.test": record})
    (result,) = await dkim_verify.verify(field + b"\r\n" + MESSAGE, keys)
    assert result.result in ("neutral", "permerror", "fail"), result


async def test_a_huge_l_tag_and_missing_signed_headers(dkim_key: tuple[bytes, str]) -> None:
    pem, record = dkim_key
    keys = Keys({"sel._domainkey.example.test": record})
    # h= names fields the message does not have: legal (they are signed as absent)
    signed = sign(MESSAGE, pem, include_headers=[b"from", b"x-nowhere", b"reply-to"])
    assert (await dkim_verify.verify(signed, keys))[0].result == "pass"
    # l= beyond the body: the signature cannot match
    lengthy = sign(MESSAGE, pem, length=True).replace(b"l=12;", b"l=999999999999;")
    assert (await dkim_verify.verify(lengthy, keys))[0].result in ("fail", "permerror")


async def test_hundreds_of_signatures_cost_no_more_than_the_limit(
    dkim_key: tuple[bytes, str]
) -> None:
    pem, record = dkim_key
    signed = sign(MESSAGE, pem)
    first = signed.split(b"\r\nFrom:")[0] + b"\r\n"
    bogus = b"".join(
        first.replace(b"s=sel", b"s=s%d" % n) for n in range(300)
    )
    keys = Keys({"sel._domainkey.example.test": record})
    started = time.monotonic()
    results = await dkim_verify.verify(bogus + signed, keys)
    assert len(results) == dkim_verify.MAX_SIGNATURES
    assert len(set(keys.asked)) <= dkim_verify.MAX_SIGNATURES
    assert time.monotonic() - started < 5


async def test_no_signature_and_no_message_structure() -> None:
    assert await dkim_verify.verify(MESSAGE, Keys({})) == []
    assert await dkim_verify.verify(b"", Keys({})) == []
    assert await dkim_verify.verify(b"\x00\xff" * 100, Keys({})) == []


async def test_a_large_message_is_verified_off_the_loop(dkim_key: tuple[bytes, str]) -> None:
    pem, record = dkim_key
    big = MESSAGE + b"x" * 70 + b"\r\n"
    big = big + (b"y" * 998 + b"\r\n") * 200  # past OFFLOAD_ABOVE
    signed = sign(big, pem)
    assert len(signed) > dkim_verify.OFFLOAD_ABOVE
    keys = Keys({"sel._domainkey.example.test": record})
    assert (await dkim_verify.verify(signed, keys))[0].result == "pass"


async def test_a_very_large_message_is_verified_in_a_worker_process(
    dkim_key: tuple[bytes, str]
) -> None:
    pem, record = dkim_key
    big = MESSAGE + (b"z" * 998 + b"\r\n") * 1100  # past PROCESS_ABOVE
    signed = sign(big, pem)
    assert len(signed) > dkim_verify.PROCESS_ABOVE
    keys = Keys({"sel._domainkey.example.test": record})
    assert (await dkim_verify.verify(signed, keys))[0].result == "pass"
    bad = signed.replace(b"zzzz\r\n", b"zzzy\r\n", 1)
    assert (await dkim_verify.verify(bad, keys))[0].result == "fail"


def test_the_rfc6376_canonicalization_example() -> None:
    """RFC 6376 §3.4.6: the library we verify with canonicalizes as the RFC's example says."""
    from dkim.canonicalization import Relaxed, Simple

    # dkimpy's own parser refuses "B :" (white space before the colon), so fields are given
    headers = [(b"A", b" X\r\n"), (b"B ", b" Y\t\r\n\tZ  \r\n")]
    body = b" C \r\nD \t E\r\n\r\n\r\n"
    relaxed = b"".join(n + b":" + v for n, v in Relaxed.canonicalize_headers(headers))
    assert relaxed == b"a:X\r\nb:Y Z\r\n"
    assert Relaxed.canonicalize_body(body) == b" C\r\nD E\r\n"
    simple = b"".join(n + b":" + v for n, v in Simple.canonicalize_headers(headers))
    assert simple == b"A: X\r\nB : Y\t\r\n\tZ  \r\n"
    assert Simple.canonicalize_body(body) == b" C \r\nD \t E\r\n"
