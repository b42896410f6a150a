"""Intake's signing step: which mail is signed, rewritten and sealed, through real intake."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import dkim
import pytest

from mailhaven.intake.cleanup import Intake, Queued
from mailhaven.proto.envelope import Envelope, RecipientSpec
from mailhaven.routing.srs import SRS, SRS_SENDER
from mailhaven.scheduler.active import ActiveQueue
from mailhaven.signing import keys as keystore
from mailhaven.signing import outbound as outbound_module
from mailhaven.signing import signer
from mailhaven.signing.outbound import Outbound, from_domain
from mailhaven.spool import Spool

NOW = 1_796_000_000.0
LOCAL = {"example.org", "fwd.example.org"}
ALIASES = {"list@example.org": ["alice@example.org", "friend@elsewhere.example"]}
MESSAGE = (
    b"From: Alice <alice@example.org>\r\nTo: list@example.org\r\nSubject: hi\r\n"
    b"Authentication-Results: mx.example.org; spf=pass smtp.mailfrom=a@remote.example\r\n"
    b"\r\nbody\r\n"
)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, list[keystore.SigningKey]]:
    folder = tmp_path / "dkim"
    keystore.generate(folder, "example.org", "rsa-1", "rsa")
    keystore.generate(folder, "example.org", "ed-1", "ed25519")
    return keystore.load_all(folder, {})


def dns_for(keys: dict[str, list[keystore.SigningKey]]):  # type: ignore[no-untyped-def]
    records = {k.record_name: k.txt_value().encode() for ks in keys.values() for k in ks}
    return lambda name, timeout=5: records.get(name.decode().rstrip("."))


def outbound(keys: dict[str, list[keystore.SigningKey]], helper: bool = False) -> Outbound:
    return Outbound(
        keys=keys,
        arc_key=next(k for k in keys["example.org"] if k.algorithm == "rsa"),
        srs=SRS([b"secret"], "fwd.example.org"),
        server_id="mx.example.org",
        is_local_domain=lambda d: d.lower() in LOCAL,
        trusted_networks=["10.0.0.0/8"],
        clock=lambda: NOW,
        helper=helper,
    )


def intake(spool: Spool, hook: Outbound) -> Intake:
    def expand(address: str) -> Sequence[str]:
        return ALIASES.get(address, [address])

    return Intake(ActiveQueue(spool, wake=lambda: None), hostname="mx.example.org",
                  expand=expand, clock=lambda: NOW, outbound=hook)


def env(sender: str, *rcpts: str, **kw: object) -> Envelope:
    return Envelope(sender, tuple(RecipientSpec(r) for r in rcpts), **kw)  # type: ignore[arg-type]


async def submit(spool: Spool, hook: Outbound, envelope: Envelope, data: bytes) -> bytes:
    writer = spool.new_message()
    writer.write(data)
    outcome = await intake(spool, hook).submit(writer, envelope)
    assert isinstance(outcome, Queued)
    return await stored_bytes(spool, outcome.queue_id)


async def stored_bytes(spool: Spool, queue_id: str) -> bytes:
    stored = await spool.load(queue_id)
    assert stored is not None
    with stored.open() as f:
        return f.read()


@pytest.mark.parametrize("how", [
    {"auth_user": "alice", "client_address": "192.0.2.1"},
    {"client_address": "10.1.2.3"},
    {"protocol": "local"},
])
@pytest.mark.parametrize("helper", [False, True])
async def test_mail_from_us_is_dual_signed(
    spool: Spool, keys: dict[str, list[keystore.SigningKey]], how: dict[str, str], helper: bool
) -> None:
    hook = outbound(keys, helper)
    try:
        stored = await submit(spool, hook, env("alice@example.org", "x@remote.example", **how),
                              MESSAGE)
    finally:
        await hook.close()
    assert stored.count(b"DKIM-Signature:") == 2
    for index in (0, 1):
        assert dkim.DKIM(stored).verify(idx=index, dnsfunc=dns_for(keys))


async def test_private_key_operations_run_in_the_signing_thread(
    spool: Spool, keys: dict[str, list[keystore.SigningKey]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop thread does the hashing; both signatures of a message go to the signing thread
    as one job; after `close` (a reload replaced the hook) signing still works, in place."""
    jobs: list[tuple[str, int]] = []

    def spy(chosen: Sequence[keystore.SigningKey], datas: Sequence[bytes]) -> list[bytes]:
        jobs.append((threading.current_thread().name, len(datas)))
        return signer.sign_all(chosen, datas)

    monkeypatch.setattr(outbound_module, "sign_all", spy)
    hook = outbound(keys)
    envelope = env("alice@example.org", "x@remote.example", auth_user="alice")
    try:
        first = await submit(spool, hook, envelope, MESSAGE)
    finally:
        await hook.close()
    later = await submit(spool, hook, envelope, MESSAGE)
    assert jobs[0][0].startswith("dkim-sign") and jobs[0][1] == 2
    assert jobs[1] == (threading.current_thread().name, 2)
    for stored in (first, later):
        for index in (0, 1):
            assert dkim.DKIM(stored).verify(idx=index, dnsfunc=dns_for(keys))


async def test_large_message_is_signed_too(
    spool: Spool, keys: dict[str, list[keystore.SigningKey]]
) -> None:
    big = MESSAGE + b"line of text\r\n" * 5000  # above the inline limit: read in a thread
    stored = await submit(spool, outbound(keys), env("alice@example.org", "x@remote.example",
                                                     auth_user="alice"), big)
    assert dkim.verify(stored, dnsfunc=dns_for(keys))


async def test_untrusted_and_foreign_mail_is_not_signed(
    spool: Spool, keys: dict[str, list[keystore.SigningKey]]
) -> None:
    mx = env("a@remote.example", "alice@example.org", client_address="192.0.2.1")
    assert b"DKIM-Signature" not in await submit(spool, outbound(keys), mx, MESSAGE)
    foreign = MESSAGE.replace(b"alice@example.org>", b"a@gmail.example>")
    ours = env("a@gmail.example", "x@remote.example", auth_user="alice")
    assert b"DKIM-Signature" not in await submit(spool, outbound(keys), ours, foreign)


async def test_subdomain_signs_with_parent_keys(
    keys: dict[str, list[keystore.SigningKey]]
) -> None:
    hook = outbound(keys)
    assert hook.keys_for("news.example.org") == hook.keys_for("example.org") != ()
    assert hook.keys_for("example.org.evil.example") == ()
    assert hook.keys_for(None) == ()


def test_from_domain() -> None:
    assert from_domain(b"From: \"A, B\" <A@Example.ORG>\r\n") == "example.org"
    assert from_domain(b"To: x@y\r\nFrom: a@b.example, c@d.example\r\n") == "b.example"
    assert from_domain(b"From: undisclosed\r\n") is None
    assert from_domain(b"Subject: none\r\n") is None


async def test_forwarded_mail_gets_srs_and_arc(
    spool: Spool, keys: dict[str, list[keystore.SigningKey]]
) -> None:
    hook = outbound(keys)
    writer = spool.new_message()
    writer.write(MESSAGE)
    envelope = env("a@remote.example", "list@example.org", client_address="192.0.2.1")
    outcome = await intake(spool, hook).submit(writer, envelope)
    assert isinstance(outcome, Queued)
    stored = await spool.load(outcome.queue_id)
    assert stored is not None
    rewritten = stored.envelope.extra[SRS_SENDER]
    assert rewritten.startswith("SRS0=") and rewritten.endswith("=remote.example=a@fwd.example.org")
    assert stored.envelope.sender == "a@remote.example"  # local copies keep the original
    assert hook.srs is not None and hook.srs.reverse(rewritten, NOW) == "a@remote.example"
    data = await stored_bytes(spool, outcome.queue_id)
    assert b"DKIM-Signature" not in data
    result, _, _ = dkim.arc_verify(data, dnsfunc=dns_for(keys))
    assert result == b"pass"
    assert b"ARC-Authentication-Results: i=1; mx.example.org; spf=pass" in data


async def test_local_sender_forwarded_is_not_rewritten(
    spool: Spool, keys: dict[str, list[keystore.SigningKey]]
) -> None:
    writer = spool.new_message()
    writer.write(MESSAGE)
    envelope = env("bob@example.org", "list@example.org", auth_user="bob")
    outcome = await intake(spool, outbound(keys)).submit(writer, envelope)
    assert isinstance(outcome, Queued)
    stored = await spool.load(outcome.queue_id)
    assert stored is not None and SRS_SENDER not in stored.envelope.extra


@pytest.mark.parametrize("data", [
    b"no header at all, just text\r\n",  # intake adds the separating empty line
    b"",  # an empty message
    b"From: \xff\xfe <\xff@example.org>\r\nSubject: \x00\r\n\r\nbody\r\n",  # not UTF-8
    b"From: =?utf-8?b?QWxpY2U=?= <alice@example.org>\r\n" + b"X-Many: x\r\n" * 2000 + b"\r\n",
    b"From: alice@example.org\r\n\tfolded@example.org\r\nSubject: x\r\n\r\n" + b"a" * 5000,
])
async def test_odd_messages_are_queued_and_any_signature_verifies(
    spool: Spool, keys: dict[str, list[keystore.SigningKey]], data: bytes
) -> None:
    stored = await submit(spool, outbound(keys), env("alice@example.org", "x@remote.example",
                                                     auth_user="alice"), data)
    if b"DKIM-Signature" in stored:
        assert dkim.verify(stored, dnsfunc=dns_for(keys))
