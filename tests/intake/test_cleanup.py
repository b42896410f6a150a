"""Intake: trace header, alias expansion with original recipients, loop protection, logs."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Sequence

import pytest
from tests.fakes import Wake

from mailhaven.intake.cleanup import (
    Intake,
    Queued,
    Refused,
    needs_separator,
    received_header,
    scan_header,
)
from mailhaven.proto.envelope import Envelope, RecipientSpec
from mailhaven.scheduler.active import ActiveQueue
from mailhaven.spool import Spool, list_queue

NOW = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 +0000


def env(*rcpts: str, **kw: object) -> Envelope:
    base: dict[str, object] = {
        "sender": "alice@example.org",
        "recipients": tuple(RecipientSpec(r) for r in rcpts),
        "client_name": "client.example.org",
        "client_address": "192.0.2.7",
        "helo": "client.example.org",
        "protocol": "ESMTPS",
    }
    base.update(kw)
    return Envelope(**base)  # type: ignore[arg-type]


def test_received_header_single_recipient_with_tls() -> None:
    header = received_header(
        env("bob@example.net"),
        queue_id="QID123",
        hostname="mx.example.net",
        now=NOW,
        tls="using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)",
    )
    assert header == (
        b"Received: from client.example.org (client.example.org [192.0.2.7])\r\n"
        b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n"
        b"\tby mx.example.net (mailhaven) with ESMTPS id QID123\r\n"
        b"\tfor <bob@example.net>; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    )


def test_received_header_several_recipients_ipv6_and_hostile_helo() -> None:
    header = received_header(
        env(
            "a@example.net",
            "b@example.net",
            helo="evil\r\nBcc: x@y",
            client_name="",
            client_address="2001:db8::1",
            protocol="ESMTP",
        ),
        queue_id="Q",
        hostname="mx",
        now=NOW,
    )
    assert header == (
        b"Received: from evil??Bcc: x@y (unknown [IPv6:2001:db8::1])\r\n"
        b"\tby mx (mailhaven) with ESMTP id Q; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    )
    assert b"for <" not in header


def test_received_header_local_submission() -> None:
    header = received_header(
        env("bob@example.net", client_name="", client_address="", helo="", protocol="local"),
        queue_id="Q",
        hostname="mx",
        now=NOW,
    )
    assert header.startswith(b"Received: by mx (mailhaven) id Q\r\n\tfor <bob@example.net>; ")


def test_scan_header_counts_received_and_finds_message_id() -> None:
    head = (
        b"Received: from a\r\n\tby b; date\r\nReceived: from c by d\r\n"
        b"Message-ID:\r\n <abc@example.org>\r\nSubject: x\r\n\r\n"
        b"Received: in the body does not count\r\n"
    )
    facts = scan_header(head)
    assert facts.received_count == 2 and facts.message_id == "<abc@example.org>"
    assert scan_header(b"").received_count == 0


@pytest.mark.parametrize(
    "separator", [b"\r\n\r\n", b"\n\n", b"\n\r\n", b"\r\n\n", b"\n\n\r\n", b"\r\n\n\r\n\r\n"]
)
def test_scan_header_stops_at_the_empty_line_whatever_the_line_ends(separator: bytes) -> None:
    head = b"Received: a\r\nMessage-ID: <m@x>" + separator + b"Received: b\nMessage-ID: <n@y>\n"
    facts = scan_header(head)
    assert (facts.received_count, facts.message_id) == (1, "<m@x>")


def test_scan_header_of_a_head_without_an_empty_line_reads_all_of_it() -> None:
    facts = scan_header(b"Received: a\r\nReceived: b\r\n\tcontinued\r\nDate: x")
    assert facts.received_count == 2 and facts.has_date


ALIASES = {"team@example.net": ["ann@example.net", "bob@example.net"], "void@example.net": []}


def expand(address: str) -> Sequence[str]:
    return ALIASES.get(address, [address])


async def test_submit_expands_aliases_keeps_originals_and_logs(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    wake = Wake()
    intake = Intake(
        ActiveQueue(spool, wake=wake), hostname="mx.example.net", expand=expand, clock=lambda: NOW
    )
    writer = spool.new_message()
    writer.write(b"Message-ID: <m1@example.org>\r\nSubject: hi\r\n\r\n")
    writer.write(b"body " * 1000)  # spills to a file: the head is still scanned
    envelope = env("team@example.net", "bob@example.net", "carol@example.net")
    with caplog.at_level("INFO", logger="mailhaven"):
        outcome = await intake.submit(writer, envelope)
    assert isinstance(outcome, Queued)
    qid = outcome.queue_id
    assert outcome.reply.code == 250 and qid in outcome.reply.text
    assert wake.count == 1
    [listed] = list(list_queue(spool.root))
    assert [(r.address, r.original) for r in listed.recipients] == [
        ("ann@example.net", "team@example.net"),
        ("bob@example.net", "team@example.net"),  # delivered once, first origin kept
        ("carol@example.net", "carol@example.net"),
    ]
    msg = await spool.load(qid)
    assert msg is not None and msg.envelope == envelope
    with msg.open() as f:
        data = f.read()
    assert data.startswith(b"Received: from client.example.org")
    assert f"with ESMTPS id {qid}; ".encode() in data  # three recipients: no "for"
    assert f"{qid}: message-id=<m1@example.org>" in caplog.messages
    assert f"{qid}: from=<alice@example.org>, size={msg.size}, nrcpt=3 (queue active)" in (
        caplog.messages
    )


async def test_too_many_hops_is_refused_and_nothing_queued(spool: Spool) -> None:
    wake = Wake()
    intake = Intake(ActiveQueue(spool, wake=wake), hostname="mx", expand=expand)
    writer = spool.new_message()
    writer.write(b"".join(b"Received: from hop%d by x; date\r\n" % i for i in range(51)))
    writer.write(b"\r\nbody\r\n" + b"x" * 4096)  # spills: the body file is removed too
    assert writer.spilled
    outcome = await intake.submit(writer, env("bob@example.net"))
    assert isinstance(outcome, Refused)
    assert (outcome.reply.code, outcome.reply.enhanced) == (554, "5.4.6")
    assert wake.count == 0 and list(list_queue(spool.root)) == []
    assert list(spool.tmp_dir.iterdir()) == []


async def test_fifty_hops_is_still_accepted(spool: Spool) -> None:
    intake = Intake(ActiveQueue(spool, wake=Wake()), hostname="mx", expand=expand)
    writer = spool.new_message()
    writer.write(b"".join(b"Received: from hop%d\r\n" % i for i in range(50)) + b"\r\nx\r\n")
    assert isinstance(await intake.submit(writer, env("bob@example.net")), Queued)


async def test_everything_expanding_to_nothing_queues_nothing(spool: Spool) -> None:
    intake = Intake(ActiveQueue(spool, wake=Wake()), hostname="mx", expand=expand)
    writer = spool.new_message()
    writer.write(b"Subject: x\r\n\r\nx\r\n")
    outcome = await intake.submit(writer, env("void@example.net"))
    assert isinstance(outcome, Queued) and list(list_queue(spool.root)) == []


async def test_expand_failure_propagates_and_discards(spool: Spool) -> None:
    def broken(address: str) -> Sequence[str]:
        raise LookupError("alias map unreadable")

    intake = Intake(ActiveQueue(spool, wake=Wake()), hostname="mx", expand=broken)
    writer = spool.new_message()
    writer.write(b"x" * 5000)
    with pytest.raises(LookupError):
        await intake.submit(writer, env("bob@example.net"))
    assert list(spool.tmp_dir.iterdir()) == []


def test_submission_fixups_add_date_and_message_id_only_when_missing() -> None:
    from mailhaven.intake.cleanup import missing_headers, scan_header

    bare = scan_header(b"Subject: hi\r\n\r\nbody\r\n")
    added = missing_headers(bare, queue_id="QID1", hostname="mx.test", now=1_700_000_000.0)
    assert added.startswith(b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n")
    assert b"Message-ID: <20231114221320.QID1@mx.test>\r\n" in added
    full = scan_header(b"Date: x\r\nMessage-ID: <a@b>\r\n\r\n")
    assert missing_headers(full, queue_id="Q", hostname="h", now=0.0) == b""


@pytest.mark.parametrize(
    ("data", "needed"),
    [
        (b"look ma no headers!\r\n", True),
        (b"", True),
        (b"  indented: first line\r\n", True),  # a continuation line with no field before it
        (b"From alice@example.org Mon Jan  1\r\n", True),  # an mbox line is no header field
        (b"Subject: hi\r\n\r\nbody\r\n", False),
        (b"Subject : obsolete syntax\r\n\r\n", False),  # RFC 5322 §4.5
        (b"\r\nbody after an empty header section\r\n", False),  # the separator is there
    ],
)
def test_needs_separator_looks_at_the_first_line_only(data: bytes, needed: bool) -> None:
    assert needs_separator(data) is needed


@pytest.mark.parametrize("size", [20, 5000])  # inline and spilled (inline_limit=1024)
async def test_a_message_without_headers_is_stored_with_the_separator(
    spool: Spool, size: int
) -> None:
    """Issue 16 #1: our trace fields are followed by the empty line, so readers see the body."""
    intake = Intake(ActiveQueue(spool, wake=Wake()), hostname="mx", expand=expand)
    writer = spool.new_message()
    body = b"look ma no headers!\r\n" + b"x" * size + b"\r\n"
    writer.write(body[:7])
    writer.write(body[7:])  # chunk by chunk, as a session writes it
    outcome = await intake.submit(writer, env("bob@example.net", protocol="local"))
    assert isinstance(outcome, Queued)
    msg = await spool.load(outcome.queue_id)
    assert msg is not None
    with msg.open() as f:
        data = f.read()
    assert data.endswith(b"\r\n\r\n" + body)
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert parsed.defects == [] and "Date" in parsed and "Message-ID" in parsed
    assert parsed.get_payload().encode() == body


async def test_a_message_with_headers_gets_no_extra_empty_line(spool: Spool) -> None:
    intake = Intake(ActiveQueue(spool, wake=Wake()), hostname="mx", expand=expand)
    writer = spool.new_message()
    writer.write(b"Subject: x\r\n\r\nbody\r\n")
    outcome = await intake.submit(writer, env("bob@example.net"))
    assert isinstance(outcome, Queued)
    msg = await spool.load(outcome.queue_id)
    assert msg is not None and not msg.header.endswith(b"\r\n\r\n")
