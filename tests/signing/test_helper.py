"""The signing helper process: signatures from it verify, and its failures cost nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import dkim
import pytest

from mailhaven.signing import keys as keystore
from mailhaven.signing.canon import hash_body, parse_fields, split_message
from mailhaven.signing.helper import SigningHelper
from mailhaven.signing.signer import finish_field, select_headers, signature_request

MESSAGE = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: s\r\n\r\nbody\r\n"


@pytest.fixture
def keys(tmp_path: Path) -> list[keystore.SigningKey]:
    return [keystore.generate(tmp_path, "example.org", "rsa", "rsa"),
            keystore.generate(tmp_path, "example.org", "ed", "ed25519")]


def dns_for(keys: list[keystore.SigningKey]):  # type: ignore[no-untyped-def]
    records = {k.record_name: k.txt_value().encode() for k in keys}
    return lambda name, timeout=5: records.get(name.decode().rstrip("."))


async def signed_by(helper: SigningHelper, keys: list[keystore.SigningKey]) -> bytes:
    head, body = split_message(MESSAGE)
    fields = parse_fields(head)
    requests = [signature_request(k, fields, hash_body([body]), select_headers(fields), now=1)
                for k in keys]
    sigs = await asyncio.gather(*(helper.sign(k, d) for k, (_, d) in zip(keys, requests,
                                                                           strict=True)))
    return b"".join(finish_field("DKIM-Signature", p, s)
                    for (p, _), s in zip(requests, sigs, strict=True)) + MESSAGE


async def test_helper_signs_many_in_order(keys: list[keystore.SigningKey]) -> None:
    helper = SigningHelper(keys)
    try:
        messages = await asyncio.gather(*(signed_by(helper, keys) for _ in range(20)))
        assert helper._proc is not None and helper._proc.returncode is None  # it did the work
        for message in messages[:3]:
            for index in (0, 1):
                assert dkim.DKIM(message).verify(idx=index, dnsfunc=dns_for(keys))
    finally:
        await helper.close()
    assert helper._proc is None


async def test_a_dead_helper_falls_back_to_signing_here(
    keys: list[keystore.SigningKey], caplog: pytest.LogCaptureFixture
) -> None:
    helper = SigningHelper(keys)
    try:
        await signed_by(helper, keys)
        assert helper._proc is not None
        helper._proc.kill()
        await helper._proc.wait()
        with caplog.at_level("WARNING", logger="mailhaven.dkim"):
            for _ in range(3):
                message = await signed_by(helper, keys)
                assert dkim.verify(message, dnsfunc=dns_for(keys))
        assert "signing helper stopped" in caplog.text
    finally:
        await helper.close()


async def test_a_key_unknown_to_the_helper_is_signed_here(
    keys: list[keystore.SigningKey], tmp_path: Path
) -> None:
    helper = SigningHelper(keys[:1])
    try:
        message = await signed_by(helper, keys)  # the Ed25519 key was not given to it
        assert dkim.DKIM(message).verify(idx=1, dnsfunc=dns_for(keys))
    finally:
        await helper.close()
