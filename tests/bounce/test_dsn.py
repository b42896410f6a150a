"""Delivery status notifications: parsed back with the stdlib `email` package."""

from __future__ import annotations

import email
import email.policy
import io
from email.message import EmailMessage, Message
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailhaven.bounce.dsn import (
    MAX_RETURNED_HEADERS,
    DsnKind,
    RecipientResult,
    bounce_target,
    build_dsn,
    return_content_for,
    should_notify,
)
from mailhaven.proto.envelope import Envelope, RecipientSpec
from mailhaven.proto.replies import Reply

ARRIVAL = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 +0000
NOW = ARRIVAL + 3 * 3600

ORIGINAL = (
    b"Received: from client.example.org by mail.example.com\n"
    b"\tfor <bob@example.net>; Tue, 14 Nov 2023 22:13:20 +0000\n"
    b"From: Alice <alice@example.org>\n"
    b"To: bob@example.net\n"
    b"Subject: lunch?\n"
    b"Message-ID: <lunch-1@example.org>\n"
    b"\n"
    b"Shall we have lunch on Friday?\n"
    b"-- \n"
    b"Alice\n"
)

ENVELOPE = Envelope(
    sender="alice@example.org",
    recipients=(
        RecipientSpec("bob@example.net", orcpt=("rfc822", "Bob@Example.net")),
        RecipientSpec("carol@example.net"),
    ),
    dsn_envid="QQ314159",
)

BOB = RecipientResult.from_reply(
    "bob@example.net",
    Reply(550, "<bob@example.net>: Recipient address rejected: User unknown", "5.1.1"),
    "failed",
    original_recipient=("rfc822", "Bob@Example.net"),
    remote_mta="mx.example.net",
    last_attempt=NOW - 60,
)
CAROL = RecipientResult(
    final_recipient="carol@example.net",
    action="failed",
    status="5.2.2",
    diagnostic_code="smtp; 552 5.2.2 Mailbox full",
)


def dsn(**overrides: Any) -> bytes:
    args: dict[str, Any] = {
        "reporting_mta": "mail.example.com",
        "original_envelope": ENVELOPE,
        "queue_id": "4F2A1B3C",
        "arrival_time": ARRIVAL,
        "now": NOW,
        "recipients": [BOB, CAROL],
        "kind": "failure",
        "original_message": io.BytesIO(ORIGINAL),
        "return_content": "headers",
        "postmaster_address": "postmaster@example.com",
        "message_id_domain": "example.com",
        "token": "fixedtoken",
    }
    args.update(overrides)
    return build_dsn(**args)


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def parts(message: EmailMessage) -> list[EmailMessage]:
    return list(message.iter_parts())  # type: ignore[arg-type]


def status_groups(message: EmailMessage) -> list[Message]:
    """The blocks of the message/delivery-status part, as the stdlib splits them."""
    groups = parts(message)[1].get_payload()
    assert isinstance(groups, list)
    return [group for group in groups if isinstance(group, Message)]


def embedded(part: EmailMessage) -> EmailMessage:
    """The message inside a message/rfc822 part."""
    payload = part.get_payload()
    assert isinstance(payload, list)
    assert isinstance(payload[0], EmailMessage)
    return payload[0]


# -- structure -----------------------------------------------------------------------------


def test_failure_is_a_multipart_report_with_three_parts() -> None:
    message = parse(dsn())
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(message)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert not message.defects
    assert all(not p.defects for p in parts(message))


def test_top_level_headers() -> None:
    data = dsn()
    assert b"\r\nFrom: MAILER-DAEMON@mail.example.com (Mail Delivery System)\r\n" in b"\r\n" + data
    message = parse(data)
    assert message["To"] == "alice@example.org"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert message["Date"] == "Wed, 15 Nov 2023 01:13:20 +0000"
    assert message["Message-ID"] == "<20231115011320.4F2A1B3C.fixedtoken@example.com>"
    assert message["In-Reply-To"] == "<lunch-1@example.org>"
    assert message["References"] == "<lunch-1@example.org>"


def test_crlf_everywhere_and_short_lines() -> None:
    data = dsn(return_content="full")
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def test_deterministic_with_a_fixed_token() -> None:
    assert dsn() == dsn()
    assert dsn(token="a") != dsn(token="b")


def test_random_token_by_default() -> None:
    assert dsn(token=None) != dsn(token=None)


def test_human_readable_part_lists_each_recipient() -> None:
    text = parts(parse(dsn()))[0].get_content().replace("\r\n", "\n")
    assert text.startswith("This is the mail system at host mail.example.com.")
    assert "<postmaster@example.com>" in text
    assert (
        "<bob@example.net>: host mx.example.net said: 550 5.1.1 <bob@example.net>:\n"
        "    Recipient address rejected: User unknown\n"
    ) in text
    assert "<carol@example.net>: 552 5.2.2 Mailbox full" in text


def test_alias_expansion_is_told() -> None:
    expanded = RecipientResult(
        "bob@example.net", "failed", "5.2.2", original_recipient=("rfc822", "info@example.org")
    )
    text = parts(parse(dsn(recipients=[expanded])))[0].get_content()
    assert "<bob@example.net> (expanded from <info@example.org>): delivery status 5.2.2" in text


# -- message/delivery-status ---------------------------------------------------------------


def test_per_message_fields() -> None:
    per_message = status_groups(parse(dsn()))[0]
    assert per_message["Reporting-MTA"] == "dns; mail.example.com"
    assert per_message["Original-Envelope-Id"] == "QQ314159"
    assert per_message["X-Mailhaven-Queue-ID"] == "4F2A1B3C"
    assert per_message["X-Mailhaven-Sender"] == "rfc822; alice@example.org"
    assert per_message["Arrival-Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"


def test_no_envid_no_original_envelope_id() -> None:
    envelope = Envelope(sender="alice@example.org", recipients=ENVELOPE.recipients)
    per_message = status_groups(parse(dsn(original_envelope=envelope)))[0]
    assert "Original-Envelope-Id" not in per_message


def test_per_recipient_fields() -> None:
    groups = status_groups(parse(dsn()))
    assert len(groups) == 3
    bob, carol = groups[1], groups[2]
    assert bob["Final-Recipient"] == "rfc822; bob@example.net"
    assert bob["Original-Recipient"] == "rfc822; Bob@Example.net"  # ORCPT passed through
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx.example.net"
    assert " ".join(bob["Diagnostic-Code"].split()) == (
        "smtp; 550 5.1.1 <bob@example.net>: Recipient address rejected: User unknown"
    )
    assert bob["Last-Attempt-Date"] == "Wed, 15 Nov 2023 01:12:20 +0000"
    assert "Will-Retry-Until" not in bob
    # RFC 3464 §2.3.1: no ORCPT, no Original-Recipient.
    assert "Original-Recipient" not in carol
    assert "Remote-MTA" not in carol
    assert carol["Status"] == "5.2.2"


def test_from_reply_derives_status_without_enhanced_code() -> None:
    said = Reply(451, "try later", answered="RCPT TO")
    result = RecipientResult.from_reply("a@b", said, "delayed", remote_mta="mx.example")
    assert result.status == "4.0.0"
    assert result.diagnostic_code == "smtp; 451 try later"


def test_from_reply_gives_our_own_words_without_a_code_or_remote_mta() -> None:
    """Issue 16 #5: nothing "said" a connection refusal: Postfix's X-Postfix shape."""
    ours = Reply(421, "connect to mx.example[192.0.2.1]:25: Connection refused", "4.4.1")
    result = RecipientResult.from_reply("a@b", ours, "delayed")
    assert result.diagnostic_code == (
        "X-Mailhaven; connect to mx.example[192.0.2.1]:25: Connection refused"
    )
    assert result.remote_mta is None


def test_bad_status_is_refused() -> None:
    with pytest.raises(ValueError, match="RFC 3463"):
        RecipientResult("a@b", "failed", "550")


def test_no_recipients_is_a_caller_bug() -> None:
    with pytest.raises(ValueError):
        dsn(recipients=[])


# -- the returned original -----------------------------------------------------------------


def test_ret_hdrs_returns_only_the_header_block() -> None:
    stream = io.BytesIO(ORIGINAL)
    message = parse(dsn(original_message=stream))
    returned = parts(message)[2]
    assert returned["Content-Description"] == "Undelivered Message Headers"
    content = returned.get_payload(decode=True)
    assert isinstance(content, bytes)
    assert content.startswith(b"Received: from client.example.org")
    assert b"Subject: lunch?\r\n" in content
    assert b"lunch on Friday" not in content
    # Streamed: the body was never read.
    assert stream.tell() == ORIGINAL.index(b"\n\n") + 2


def test_ret_full_returns_the_message() -> None:
    message = parse(dsn(return_content="full"))
    returned = parts(message)[2]
    assert returned.get_content_type() == "message/rfc822"
    assert returned["Content-Description"] == "Undelivered Message"
    inner = embedded(returned)
    assert inner["Subject"] == "lunch?"
    assert inner.get_content() == "Shall we have lunch on Friday?\r\n-- \r\nAlice\r\n"


def test_ret_full_over_the_limit_falls_back_to_headers() -> None:
    message = parse(dsn(return_content="full", size_limit=100))
    returned = parts(message)[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    content = returned.get_payload(decode=True)
    assert isinstance(content, bytes)
    assert content.endswith(b"Message-ID: <lunch-1@example.org>\r\n")
    assert b"Friday" not in content
    assert "too large" in parts(message)[0].get_content()


def test_huge_header_block_is_cut_at_a_line() -> None:
    line = b"X-Filler: " + b"y" * 90 + b"\n"
    original = line * (2 * MAX_RETURNED_HEADERS // len(line)) + b"\nbody\n"
    content = parts(parse(dsn(original_message=io.BytesIO(original))))[2].get_payload(decode=True)
    assert isinstance(content, bytes)
    assert len(content) <= MAX_RETURNED_HEADERS
    assert content.endswith(b"y\r\n")


def test_original_containing_the_boundary_gets_another_boundary() -> None:
    boundary = b"4F2A1B3C.fixedtoken/mail.example.com"
    original = ORIGINAL + b"--" + boundary + b"--\n"
    message = parse(dsn(original_message=io.BytesIO(original), return_content="full"))
    assert message.get_boundary() != boundary.decode()
    assert len(parts(message)) == 3
    inner = embedded(parts(message)[2])
    assert boundary.decode() in inner.get_content()


def test_eight_bit_original_is_declared() -> None:
    original = "Subject: café\n\nna\u00efve\n".encode()
    data = dsn(original_message=io.BytesIO(original), return_content="full")
    message = parse(data)
    assert message["Content-Transfer-Encoding"] == "8bit"
    assert parts(message)[2]["Content-Transfer-Encoding"] == "8bit"
    assert message.get_content_type() == "multipart/report"


def test_return_content_for() -> None:
    full = Envelope(sender="a@b", recipients=(), dsn_ret="FULL")
    binary = Envelope(sender="a@b", recipients=(), dsn_ret="FULL", body_type="BINARYMIME")
    assert return_content_for(full, "failure") == "full"
    assert return_content_for(full, "expired") == "full"
    assert return_content_for(full, "delay") == "headers"
    assert return_content_for(full, "success") == "headers"
    assert return_content_for(binary, "failure") == "headers"
    assert return_content_for(Envelope(sender="a@b", recipients=()), "failure") == "headers"


# -- kinds ---------------------------------------------------------------------------------


def test_delay_warning() -> None:
    until = ARRIVAL + 5 * 86400
    bob = RecipientResult.from_reply(
        "bob@example.net",
        Reply(451, "4.4.1 Connection timed out", "4.4.1"),
        "delayed",
        remote_mta="mx.example.net",
        will_retry_until=until,
    )
    message = parse(dsn(kind="delay", recipients=[bob]))
    assert message["Subject"] == "Delayed Mail (still being retried)"
    text = parts(message)[0].get_content()
    assert "THIS IS A WARNING ONLY" in text
    assert "could not be delivered for 3.0 hours" in text
    assert "retried until Sun, 19 Nov 2023 22:13:20 +0000" in text
    group = status_groups(message)[1]
    assert group["Action"] == "delayed"
    assert group["Status"] == "4.4.1"
    assert group["Will-Retry-Until"] == "Sun, 19 Nov 2023 22:13:20 +0000"


def test_success_report() -> None:
    done = RecipientResult.from_reply(
        "bob@example.net", Reply(250, "Ok: queued as 9D", "2.0.0"), "relayed", remote_mta="mx"
    )
    message = parse(dsn(kind="success", recipients=[done]))
    assert message["Subject"] == "Successful Mail Delivery Report"
    text = parts(message)[0].get_content()
    assert "successfully delivered" in text
    assert "For further assistance" not in text
    assert "<bob@example.net>: delivery via mx: 250 2.0.0 Ok: queued as 9D" in text
    assert status_groups(message)[1]["Action"] == "relayed"
    assert parts(message)[2]["Content-Description"] == "Message Headers"


def test_expired() -> None:
    message = parse(dsn(kind="expired", now=ARRIVAL + 5 * 86400))
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert "for 5.0 days, and this mail system has stopped trying" in (
        parts(message)[0].get_content()
    )


def test_double_bounce_goes_to_postmaster() -> None:
    envelope = Envelope(sender="", recipients=ENVELOPE.recipients)
    message = parse(dsn(original_envelope=envelope))
    assert message["To"] == "postmaster@example.com"
    assert message["Subject"] == "Postmaster Copy: Undelivered Mail"
    assert message["Auto-Submitted"] == "auto-generated"
    assert "X-Mailhaven-Sender" not in status_groups(message)[0]


# -- SMTPUTF8 (RFC 6533) and hostile input -------------------------------------------------


def test_smtputf8_uses_global_types_and_utf8_addresses() -> None:
    envelope = Envelope(sender="jörg@exämple.org", recipients=(), smtputf8=True)
    result = RecipientResult("björn@exämple.net", "failed", "5.1.1", diagnostic_code="smtp; 550")
    data = dsn(original_envelope=envelope, recipients=[result])
    message = parse(data)
    assert [p.get_content_type() for p in parts(message)] == [
        "text/plain",
        "message/global-delivery-status",
        "message/global-headers",
    ]
    assert message["To"] == "jörg@exämple.org"
    status = data  # the stdlib parses message/global-* as an embedded message: check the bytes
    assert "Final-Recipient: utf-8; björn@exämple.net\r\n".encode() in status
    assert b"X-Mailhaven-Sender: utf-8; j\xc3\xb6rg@ex\xc3\xa4mple.org" in status
    assert parts(message)[0].get_content_charset() == "utf-8"


def test_ascii_addresses_stay_rfc822_in_a_global_report() -> None:
    envelope = Envelope(sender="a@example.org", recipients=(), smtputf8=True)
    data = dsn(original_envelope=envelope)
    assert b"Content-Type: message/global-delivery-status\r\n" in data
    assert b"Final-Recipient: rfc822; bob@example.net\r\n" in data


def test_remote_reply_cannot_inject_fields() -> None:
    evil = RecipientResult(
        "bob@example.net",
        "failed",
        "5.0.0",
        remote_mta="mx\r\nX-Injected: yes",
        diagnostic_code="smtp; 550 no\r\n\r\n--4F2A1B3C.fixedtoken/mail.example.com--\r\nX: \x00y",
    )
    data = dsn(recipients=[evil])
    message = parse(data)
    assert len(parts(message)) == 3
    group = status_groups(message)[1]
    assert "X-Injected" not in group
    assert "X-Injected" in group["Remote-MTA"]  # still there, but as text
    assert b"\x00" not in data


def test_non_ascii_diagnostic_is_masked_in_an_ascii_report() -> None:
    result = RecipientResult("bob@example.net", "failed", "5.0.0", diagnostic_code="smtp; nö")
    data = dsn(recipients=[result])
    assert b"smtp; n?" in data
    assert parse(data)["Content-Transfer-Encoding"] == "7bit"


@settings(max_examples=50, deadline=None)
@given(
    original=st.binary(max_size=2000),
    diagnostic=st.text(max_size=300),
    full=st.booleans(),
    kind=st.sampled_from(["failure", "delay", "success", "expired"]),
)
def test_always_a_well_formed_report(
    original: bytes, diagnostic: str, full: bool, kind: DsnKind
) -> None:
    result = RecipientResult("bob@example.net", "failed", "5.0.0", diagnostic_code=diagnostic)
    data = dsn(
        recipients=[result],
        kind=kind,
        original_message=io.BytesIO(original),
        return_content="full" if full else "headers",
    )
    assert b"\n" not in data.replace(b"\r\n", b"")
    message = parse(data)
    assert message.get_content_type() == "multipart/report"
    assert len(parts(message)) == 3


# -- policy --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("notify", "kind", "expected"),
    [
        ((), "failure", True),
        ((), "expired", True),
        ((), "delay", True),
        ((), "success", False),
        (("NEVER",), "failure", False),
        (("NEVER",), "delay", False),
        (("never",), "success", False),
        (("SUCCESS",), "success", True),
        (("SUCCESS",), "failure", False),
        (("SUCCESS",), "delay", False),
        (("FAILURE",), "failure", True),
        (("FAILURE",), "expired", True),
        (("FAILURE",), "delay", False),
        (("DELAY",), "delay", True),
        (("DELAY",), "failure", False),
        (("SUCCESS", "FAILURE", "DELAY"), "success", True),
        (("success", "failure"), "failure", True),
    ],
)
def test_should_notify(notify: tuple[str, ...], kind: DsnKind, expected: bool) -> None:
    assert should_notify(notify, kind) is expected


def test_bounce_target() -> None:
    normal = Envelope(sender="alice@example.org", recipients=())
    null = Envelope(sender="", recipients=())
    double = Envelope(sender="double-bounce@example.com", recipients=())
    assert bounce_target(normal) == "sender"
    assert bounce_target(normal, "delay") == "sender"
    assert bounce_target(null) == "postmaster"
    assert bounce_target(null, "expired") == "postmaster"
    assert bounce_target(null, null_sender="drop") == "drop"
    # A bounce is never delay-warned or success-reported.
    assert bounce_target(null, "delay") == "drop"
    assert bounce_target(null, "success") == "drop"
    # A failed postmaster copy ends the chain.
    assert bounce_target(double, double_bounce_sender="Double-Bounce@example.com") == "drop"
    assert bounce_target(double) == "sender"
