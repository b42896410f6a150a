"""Delivery status notifications (bounces, delay warnings, success reports) as bytes.

Role: the scheduler decides *that* a notification is due; this module decides *whether* the
recipient's NOTIFY= allows it (`should_notify`), *where* it goes (`bounce_target`), and what it
says (`build_dsn`). The result is a complete RFC 5322 message that the caller submits through
intake with the null sender (RFC 5321 §4.5.5), so a bounce can never cause another bounce.

Format: `multipart/report; report-type=delivery-status` (RFC 6522, RFC 3464) with three parts:
1. text/plain for people, worded like Postfix's ("This is the mail system at host ...");
2. message/delivery-status for programs: per-message fields, then one group per recipient;
3. the original: text/rfc822-headers (RET=HDRS, the default) or message/rfc822 (RET=FULL).
When the original was sent with SMTPUTF8 the report uses RFC 6533's types instead:
message/global-delivery-status, message/global-headers and message/global, and non-ASCII
addresses are typed `utf-8` rather than `rfc822`. Lines end in CRLF.

Invariants: pure (time and randomness come in as `now` and `token`); the original is read
once, front to back, and never more than `size_limit + 1` bytes (headers only: the header block,
at most `MAX_RETURNED_HEADERS`). A full original above `size_limit` is replaced by its headers,
as Postfix does, because truncating a message/rfc822 part breaks its MIME structure.

Trust: recipient addresses, the remote MTA's name and its reply text come from other hosts.
Control characters are masked (and, outside SMTPUTF8 reports, non-ASCII too) before they are
written, so a remote reply cannot inject header fields or MIME boundaries into the report.
"""

from __future__ import annotations

import re
import secrets
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import BinaryIO, Literal, assert_never

from mailhaven.proto.envelope import Envelope
from mailhaven.proto.replies import Reply

DsnKind = Literal["failure", "delay", "success", "expired"]
#: RFC 3464 §2.3.3.
Action = Literal["failed", "delayed", "delivered", "relayed", "expanded"]
ReturnContent = Literal["headers", "full"]
BounceTarget = Literal["sender", "postmaster", "drop"]

#: The most of the original a notification returns, like Postfix's bounce_size_limit (50 kB
#: there); above it only the headers come back. Big enough for typical attachments.
MAX_RETURNED_MESSAGE = 10 * 1024 * 1024
#: The most header text returned; Postfix's header_size_limit is the same 100 KiB.
MAX_RETURNED_HEADERS = 100 * 1024
#: Text and field lines are wrapped here, continuation lines indented (Postfix: 79 and 4).
_WRAP_WIDTH = 79
_INDENT = "    "
#: RFC 2046 §5.1.1: a boundary is at most 70 characters from this set.
_BOUNDARY_SAFE = re.compile(r"[^0-9A-Za-z'()+_,\-./:=?]")
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What happened to one recipient, as reported in its per-recipient DSN group."""

    #: The address we tried (after alias expansion): Final-Recipient.
    final_recipient: str
    action: Action
    #: RFC 3463 status, e.g. "5.1.1".
    status: str
    #: The ORCPT= of this recipient as (addr-type, address): Original-Recipient.
    original_recipient: tuple[str, str] | None = None
    #: The host that answered, e.g. "mx.example.net": Remote-MTA (type dns).
    remote_mta: str | None = None
    #: "diagnostic-type; text", e.g. "smtp; 550 5.1.1 <a@b>: unknown user".
    diagnostic_code: str | None = None
    last_attempt: float | None = None
    #: For delayed recipients: when we give up (Will-Retry-Until).
    will_retry_until: float | None = None

    def __post_init__(self) -> None:
        if not _STATUS.fullmatch(self.status):
            raise ValueError(f"not an RFC 3463 status: {self.status!r}")

    @classmethod
    def from_reply(
        cls,
        recipient: str,
        reply: Reply,
        action: Action,
        *,
        original_recipient: tuple[str, str] | None = None,
        remote_mta: str | None = None,
        last_attempt: float | None = None,
        will_retry_until: float | None = None,
    ) -> RecipientResult:
        """The result a delivery agent's `Reply` stands for (status from its enhanced code).

        A reply a remote MTA sent is quoted whole with type `smtp`; our own words (no
        `remote_mta`: connection refused, timeouts, DNS, local delivery) are typed
        `X-Mailhaven` and carry only the text, as Postfix's `X-Postfix; connect to ...`."""
        text = " ".join(x for x in reply.lines if x)
        return cls(
            final_recipient=recipient,
            action=action,
            status=reply.dsn,
            original_recipient=original_recipient,
            remote_mta=remote_mta,
            diagnostic_code=(
                f"smtp; {reply.one_line()}" if remote_mta else f"X-Mailhaven; {text or reply.code}"
            ),
            last_attempt=last_attempt,
            will_retry_until=will_retry_until,
        )


def should_notify(notify: Sequence[str], kind: DsnKind) -> bool:
    """RFC 3461 §4.1 NOTIFY semantics for one recipient.

    No NOTIFY= means failures and delays are reported (the default Postfix and Sendmail use);
    success is reported only when asked for; NEVER silences everything.
    """
    words = {word.upper() for word in notify}
    if "NEVER" in words:
        return False
    match kind:
        case "failure" | "expired":
            return not words or "FAILURE" in words
        case "delay":
            return not words or "DELAY" in words
        case "success":
            return "SUCCESS" in words
        case _:
            assert_never(kind)


def bounce_target(
    envelope: Envelope,
    kind: DsnKind = "failure",
    *,
    null_sender: Literal["postmaster", "drop"] = "postmaster",
    double_bounce_sender: str | None = None,
) -> BounceTarget:
    """Who receives a notification about `envelope`'s message.

    Never bounce a bounce (RFC 5321 §4.5.5): a message with the null sender has
    nobody to tell, so its failures go to the postmaster as a "double bounce" (or are dropped,
    per `null_sender`), and its delays and successes are not reported at all. Postmaster copies
    should be sent from `double_bounce_sender` (Postfix: double-bounce@$myorigin); when such a
    copy fails in turn it is dropped here, which ends the loop.
    """
    if envelope.sender:
        if double_bounce_sender and envelope.sender.lower() == double_bounce_sender.lower():
            return "drop"
        return "sender"
    if kind in ("failure", "expired"):
        return null_sender
    return "drop"


def return_content_for(envelope: Envelope, kind: DsnKind) -> ReturnContent:
    """RET=FULL asks for the whole message back in failure reports (RFC 3461 §4.3); headers
    are returned otherwise. A BINARYMIME original cannot ride in an 8bit report."""
    if envelope.dsn_ret == "FULL" and kind in ("failure", "expired"):
        return "headers" if envelope.body_type == "BINARYMIME" else "full"
    return "headers"


def build_dsn(
    *,
    reporting_mta: str,
    original_envelope: Envelope,
    queue_id: str,
    arrival_time: float,
    now: float,
    recipients: Sequence[RecipientResult],
    kind: DsnKind,
    original_message: BinaryIO,
    return_content: ReturnContent = "headers",
    postmaster_address: str = "postmaster",
    message_id_domain: str | None = None,
    token: str | None = None,
    size_limit: int = MAX_RETURNED_MESSAGE,
) -> bytes:
    """The bytes of one notification about `recipients` (the caller filters by NOTIFY).

    It is addressed to the original sender, or to `postmaster_address` for a double bounce
    (null original sender). `token` makes Message-ID and boundary unique; tests pass a fixed
    one. Submit the result with the null sender, BODY=8BITMIME when it is not ASCII and
    SMTPUTF8 when `original_envelope.smtputf8`.
    """
    if not recipients:
        raise ValueError("a delivery status notification needs at least one recipient")
    token = token or secrets.token_hex(8)
    utf8 = original_envelope.smtputf8 or not all(
        r.final_recipient.isascii() and (r.original_recipient or ("", ""))[1].isascii()
        for r in recipients
    )
    headers, full = _read_original(original_message, return_content, size_limit)
    report = _Report(reporting_mta, original_envelope, queue_id, arrival_time, now, kind, utf8)
    text = report.human_text(
        recipients, postmaster_address, full is None and return_content == "full"
    )
    status = report.status_fields(recipients)
    undelivered = "" if kind == "success" else "Undelivered "
    if full is None:
        original = (f"{undelivered}Message Headers", _TYPES[utf8][1], headers)
    else:
        original = (f"{undelivered}Message", _TYPES[utf8][2], full)
    parts = [
        (_part_headers(description, ctype, body), body)
        for description, ctype, body in (
            ("Notification", "text/plain", text),
            ("Delivery report", _TYPES[utf8][0], status),
            original,
        )
    ]
    boundary = _boundary(queue_id, token, reporting_mta, [body for _, body in parts])
    to = original_envelope.sender or postmaster_address
    top = [
        f"From: MAILER-DAEMON@{reporting_mta} (Mail Delivery System)",
        f"To: {_mask(to, utf8)}",
        f"Subject: {_subject(kind, postmaster_copy=not original_envelope.sender)}",
        f"Date: {_date(now)}",
        f"Message-ID: <{_stamp(now)}.{queue_id}.{token}@{message_id_domain or reporting_mta}>",
    ]
    original_id = _message_id(headers)
    if original_id:
        top += [f"References: {original_id}", f"In-Reply-To: {original_id}"]
    top += [
        # RFC 3834 §5: a reply to one message is auto-replied; a postmaster copy is not.
        f"Auto-Submitted: {'auto-replied' if original_envelope.sender else 'auto-generated'}",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        f"Content-Transfer-Encoding: {'7bit' if all(b.isascii() for _, b in parts) else '8bit'}",
        "",
        "This is a MIME-encapsulated message.",
    ]
    out = [_lines(top)]
    for part_headers, body in parts:
        out += [b"\r\n--", boundary.encode(), b"\r\n", part_headers, b"\r\n", body]
    out += [b"\r\n--", boundary.encode(), b"--\r\n"]
    return b"".join(out)


#: Content types of parts 2 and 3 (headers, full), plain and SMTPUTF8 (RFC 6533 §6).
_TYPES = {
    False: ("message/delivery-status", "text/rfc822-headers", "message/rfc822"),
    True: ("message/global-delivery-status", "message/global-headers", "message/global"),
}

#: The opening of the text part, per kind; {age} is the time in queue, {until} the give-up time.
_INTROS: dict[DsnKind, tuple[str, ...]] = {
    "failure": (
        "I'm sorry to have to inform you that your message could not",
        "be delivered to one or more recipients. It's attached below.",
    ),
    "expired": (
        "Your message could not be delivered to one or more recipients",
        "for {age}, and this mail system has stopped trying.",
        "It's attached below.",
    ),
    "delay": (
        "#" * 68,
        "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
        "#" * 68,
        "",
        "Your message could not be delivered for {age}.",
        "{until}",
    ),
    "success": (
        "Your message was successfully delivered to the destination(s)",
        "listed below. If the message was delivered to mailbox you will",
        "receive no further notifications. Otherwise you may still receive",
        "notifications of mail delivery errors from other systems.",
    ),
}


@dataclass(frozen=True, slots=True)
class _Report:
    """Renders parts 1 and 2 from what the envelope, the kind and the clock say."""

    host: str
    env: Envelope
    queue_id: str
    arrival: float
    now: float
    kind: DsnKind
    utf8: bool

    def human_text(
        self, recipients: Sequence[RecipientResult], postmaster: str, too_big: bool
    ) -> bytes:
        until = max((r.will_retry_until or 0.0) for r in recipients)
        values = {
            "age": _duration(self.now - self.arrival),
            "until": f"It will be retried until {_date(until)}." if until else "",
        }
        lines = [f"This is the mail system at host {self.host}.", ""]
        lines += [line.format(**values) for line in _INTROS[self.kind]]
        if too_big:
            lines += ["", "The returned message was too large; only its headers are attached."]
        if self.kind != "success":
            lines += [
                "",
                f"For further assistance, please send mail to <{postmaster}>.",
                "",
                "If you do so, please include this problem report. You can",
                "delete your own text from the attached returned message.",
            ]
        lines += ["", "                   The mail system"]
        for r in recipients:
            lines += ["", *_wrap(self._explain(r))]
        return _lines(lines)

    def _explain(self, r: RecipientResult) -> str:
        """Postfix's one-line story of a recipient: `<a@b>: host mx said: 550 ...`."""
        who = f"<{self._clean(r.final_recipient)}>"
        if r.original_recipient and r.original_recipient[1].lower() != r.final_recipient.lower():
            who += f" (expanded from <{self._clean(r.original_recipient[1])}>)"
        text = self._clean((r.diagnostic_code or "").partition(";")[2].strip())
        remote = self._clean(r.remote_mta or "")
        if self.kind == "success":
            via = f" via {remote}" if remote else ""
            return f"{who}: delivery{via}: {text or r.action}"
        if remote and text:
            return f"{who}: host {remote} said: {text}"
        return f"{who}: {text or f'delivery status {r.status}'}"

    def status_fields(self, recipients: Sequence[RecipientResult]) -> bytes:
        """RFC 3464 §2.2 per-message fields, then one §2.3 group per recipient."""
        fields = [f"Reporting-MTA: dns; {self.host}"]
        if self.env.dsn_envid:
            fields.append(f"Original-Envelope-Id: {self._clean(self.env.dsn_envid)}")
        fields.append(f"X-Mailhaven-Queue-ID: {self.queue_id}")
        if self.env.sender:
            fields.append(f"X-Mailhaven-Sender: {self._address(self.env.sender)}")
        fields.append(f"Arrival-Date: {_date(self.arrival)}")
        for r in recipients:
            fields += ["", f"Final-Recipient: {self._address(r.final_recipient)}"]
            if r.original_recipient:
                kind, address = r.original_recipient
                fields.append(f"Original-Recipient: {kind}; {self._clean(address)}")
            fields += [f"Action: {r.action}", f"Status: {r.status}"]
            if r.remote_mta:
                fields += _wrap(f"Remote-MTA: dns; {self._clean(r.remote_mta)}")
            if r.diagnostic_code:
                fields += _wrap(f"Diagnostic-Code: {self._clean(r.diagnostic_code)}")
            if r.last_attempt is not None:
                fields.append(f"Last-Attempt-Date: {_date(r.last_attempt)}")
            if r.action == "delayed" and r.will_retry_until is not None:
                fields.append(f"Will-Retry-Until: {_date(r.will_retry_until)}")
        return _lines(fields)

    def _address(self, address: str) -> str:
        """RFC 6533 §3: "utf-8" for a non-ASCII address in a global report, else rfc822."""
        kind = "utf-8" if self.utf8 and not address.isascii() else "rfc822"
        return f"{kind}; {self._clean(address)}"

    def _clean(self, text: str) -> str:
        return _mask(text, self.utf8)


def _part_headers(description: str, content_type: str, body: bytes) -> bytes:
    """A body part's header; 8bit and utf-8 are declared only when the body needs them."""
    if content_type == "text/plain":
        content_type += "; charset=us-ascii" if body.isascii() else "; charset=utf-8"
    lines = [f"Content-Description: {description}", f"Content-Type: {content_type}"]
    if not body.isascii():
        lines.append("Content-Transfer-Encoding: 8bit")
    return _lines(lines)


def _read_original(
    stream: BinaryIO, return_content: ReturnContent, size_limit: int
) -> tuple[bytes, bytes | None]:
    """(header block, whole message or None), both with CRLF line ends.

    The header block is read line by line up to the blank line, so RET=HDRS never touches the
    body. For the full message the rest is read with one bounded `read`: a message over
    `size_limit` (or with an over-long header block) comes back as its headers only.
    """
    lines: list[bytes] = []
    total = 0
    complete = False
    while True:
        line = _crlf(stream.readline(MAX_RETURNED_HEADERS + 1))
        if not line or line == b"\r\n":
            complete = True
            break
        if total + len(line) > MAX_RETURNED_HEADERS:
            break
        lines.append(line if line.endswith(b"\r\n") else line + b"\r\n")
        total += len(line)
    head = b"".join(lines)
    if return_content == "headers" or not complete:
        return head, None
    rest = _crlf(stream.read(max(0, size_limit - total) + 1))
    if total + len(rest) > size_limit:
        return head, None
    full = head + b"\r\n" + rest if rest else head
    return head, full if full.endswith(b"\r\n") or not full else full + b"\r\n"


def _message_id(headers: bytes) -> str | None:
    """The original's Message-ID, for References/In-Reply-To, if it is well formed."""
    unfolded = re.sub(rb"\r\n[ \t]+", b" ", headers)
    found = re.search(rb"(?im)^message-id:[ \t]*(<[!-;=?-~]+@[!-;=?-~]+>)[ \t]*\r?$", unfolded)
    return found.group(1).decode("ascii") if found else None


def _boundary(queue_id: str, token: str, host: str, bodies: Sequence[bytes]) -> str:
    """Postfix's shape (queue id . token / host), kept out of every part's text."""
    base = _BOUNDARY_SAFE.sub("-", f"{queue_id}.{token}/{host}")[:64]
    candidate, n = base, 0
    while any(b"--" + candidate.encode() in body for body in bodies):
        n += 1
        candidate = f"{base}.{n}"
    return candidate


def _subject(kind: DsnKind, *, postmaster_copy: bool) -> str:
    match kind:
        case "failure" | "expired":
            if postmaster_copy:
                return "Postmaster Copy: Undelivered Mail"
            return "Undelivered Mail Returned to Sender"
        case "delay":
            return "Delayed Mail (still being retried)"
        case "success":
            return "Successful Mail Delivery Report"
        case _:
            assert_never(kind)


def _mask(text: str, utf8: bool) -> str:
    """Controls become spaces; non-ASCII becomes "?" unless the report may carry UTF-8."""
    text = _CONTROL.sub(" ", text)
    return text if utf8 or text.isascii() else text.encode("ascii", "replace").decode("ascii")


def _wrap(line: str) -> list[str]:
    return textwrap.wrap(
        line,
        width=_WRAP_WIDTH,
        subsequent_indent=_INDENT,
        break_long_words=False,
        break_on_hyphens=False,
    ) or [line]


def _duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{max(1, round(seconds / 60))} minutes"


def _date(when: float) -> str:
    """RFC 5322 §3.3 date-time in UTC, e.g. "Tue, 10 Oct 2023 10:10:08 +0000"."""
    return format_datetime(datetime.fromtimestamp(when, UTC))


def _stamp(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y%m%d%H%M%S")


def _crlf(data: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", data)


def _lines(lines: Sequence[str]) -> bytes:
    return "".join(f"{line}\r\n" for line in lines).encode("utf-8")
