"""Outbound SMTP client core (RFC 5321), sans-I/O: replies in, commands and body bytes out.

`ClientConnection` drives one session: greeting, EHLO (HELO when EHLO gets a 5xx), optional
STARTTLS, optional AUTH PLAIN/LOGIN, then any number of mail transactions, then QUIT. The adapter
feeds what the peer sent (`receive_data`; `b""` is end of file), pulls events (`next_event`),
and writes `data_to_send()`. It owns the socket, TLS and the clock; `phase` says which reply we
wait for so that it can pick the RFC 5321 §4.5.3.2 timeout (`Timeouts.for_phase`).

A transaction goes out as MAIL, RCPT... and DATA, in one write when the peer offers PIPELINING
(RFC 2920), and the replies are matched in order. The result is one `Reply` per recipient: its
RCPT reply when rejected, the end-of-data reply when accepted, the MAIL reply for all when MAIL
fails. Failures before the session is ready (greeting, EHLO, STARTTLS, AUTH) are
`SessionFailed`, so the caller can try the next MX. Losing the connection (EOF, timeout, 421)
ends any open transaction with a 4xx for every undecided recipient. Every reply the peer sent
carries `answered` (the greeting or the command it answered); the ones this core makes up
(bad address, lost connection, TLS required) do not, so logs can say whose words they are.

LMTP (RFC 2033) is a mode (`lmtp=True`): LHLO instead of EHLO, with no HELO fallback, and after
the final dot one reply per recipient whose RCPT succeeded, in RCPT order; each becomes that
recipient's result. A connection lost half-way keeps the replies already read and gives the rest
a 4xx: they are retried (at least once, never lost), the others are not sent twice.

Rules applied here, before anything reaches the wire: a CR, LF or NUL in an address fails that
address (a CRLF in a path is command injection); a message larger than the peer's SIZE fails
every recipient with 552 5.3.4 (RFC 1870 §6); a message that needs SMTPUTF8 (flagged, or with a
non-ASCII address) fails with 550 5.6.7 when the peer lacks it (RFC 6531 §3.2). An 8-bit body
goes to a peer without 8BITMIME unchanged, as Postfix does; MIME downgrading is out of scope.

SECURITY: the body is sent as stored except for line endings: every CR, LF or CRLF becomes CRLF
and a leading "." is doubled, so no stored byte sequence can end the DATA early or be read as a
line end by a lax peer (SMTP smuggling). After the 220 to STARTTLS every buffered byte is
discarded: it arrived in clear text and must not be read as if it came over TLS.
"""

from __future__ import annotations

import base64
import enum
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import assert_never

from mailhaven.proto.address import xtext_encode
from mailhaven.proto.envelope import Envelope, RecipientSpec
from mailhaven.proto.replies import Reply
from mailhaven.proto.sansio import NEED_DATA, PAUSED, UsageError, Wait
from mailhaven.proto.smtp_client_events import (
    Closed,
    Event,
    Ready,
    SendBody,
    SessionFailed,
    StartTLS,
    TransactionDone,
)

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "Capabilities",
    "ClientConnection",
    "Closed",
    "Credentials",
    "Event",
    "MailTransaction",
    "Phase",
    "Ready",
    "ReplyError",
    "ReplyReader",
    "SendBody",
    "SessionFailed",
    "StartTLS",
    "StartTLSPolicy",
    "Timeouts",
    "TransactionDone",
    "UsageError",
    "Wait",
    "soft_bounce",
]


class Phase(enum.Enum):
    """What the session waits for; the reply phases name RFC 5321 §4.5.3.2's timeouts."""

    GREETING = "greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    LHLO = "LHLO"  # LMTP (RFC 2033 §4.1) instead of EHLO/HELO
    STARTTLS = "STARTTLS"
    TLS_HANDSHAKE = "TLS handshake"  # the adapter's turn: handshake, then tls_started()
    AUTH = "AUTH"
    READY = "ready"  # the caller's turn: start() or quit()
    MAIL = "MAIL FROM"
    RCPT = "RCPT TO"
    DATA_INIT = "DATA"
    DATA_BLOCK = "message body"  # the caller's turn: send_body()..., end_body()
    DATA_END = "end of data"
    RSET = "RSET"
    QUIT = "QUIT"
    CLOSED = "closed"


P = Phase
#: The legal phase changes, as data (h11's idea): checked on every step, drawable in the docs.
TRANSITIONS: Mapping[Phase, frozenset[Phase]] = {
    P.GREETING: frozenset({P.EHLO, P.LHLO, P.QUIT, P.CLOSED}),
    P.EHLO: frozenset({P.HELO, P.STARTTLS, P.AUTH, P.READY, P.QUIT, P.CLOSED}),
    P.HELO: frozenset({P.AUTH, P.READY, P.QUIT, P.CLOSED}),
    P.LHLO: frozenset({P.STARTTLS, P.AUTH, P.READY, P.QUIT, P.CLOSED}),
    P.STARTTLS: frozenset({P.TLS_HANDSHAKE, P.AUTH, P.READY, P.QUIT, P.CLOSED}),
    P.TLS_HANDSHAKE: frozenset({P.EHLO, P.LHLO, P.CLOSED}),
    P.AUTH: frozenset({P.READY, P.QUIT, P.CLOSED}),
    P.READY: frozenset({P.MAIL, P.QUIT, P.CLOSED}),
    P.MAIL: frozenset({P.RCPT, P.READY, P.CLOSED}),
    P.RCPT: frozenset({P.DATA_INIT, P.RSET, P.CLOSED}),
    P.DATA_INIT: frozenset({P.DATA_BLOCK, P.DATA_END, P.RSET, P.READY, P.CLOSED}),
    P.DATA_BLOCK: frozenset({P.DATA_END, P.CLOSED}),
    P.DATA_END: frozenset({P.READY, P.CLOSED}),
    P.RSET: frozenset({P.READY, P.QUIT, P.CLOSED}),
    P.QUIT: frozenset({P.CLOSED}),
    P.CLOSED: frozenset(),
}
_SETUP = frozenset({P.GREETING, P.EHLO, P.HELO, P.LHLO, P.STARTTLS, P.TLS_HANDSHAKE, P.AUTH})
_NOTIFY = frozenset({"SUCCESS", "FAILURE", "DELAY", "NEVER"})
#: RFC 5321 §4.5.3.1.5 allows 512 octets; like Postfix (line_length_limit) we accept 2048.
MAX_REPLY_LINE_ACCEPTED = 2048
#: RFC 5321 sets no bound on reply lines; EHLO lists are the longest, and 100 is plenty.
MAX_REPLY_LINES = 100
#: What a reply in each phase answered, in Postfix's words ("in reply to end of DATA command").
_ANSWERED = {P.DATA_END: "end of DATA"}
#: What we were doing when the connection broke, in Postfix smtp(8)'s words ("lost connection
#: with H while ..."; "conversation with H timed out while ...").
_DOING = {
    P.GREETING: "receiving the initial server greeting",
    P.EHLO: "performing the EHLO handshake",
    P.HELO: "performing the HELO handshake",
    P.LHLO: "performing the LHLO handshake",
    P.STARTTLS: "receiving the STARTTLS response",
    P.TLS_HANDSHAKE: "performing the TLS handshake",
    P.AUTH: "performing the SASL authentication",
    P.MAIL: "sending MAIL FROM",
    P.RCPT: "sending RCPT TO",
    P.DATA_INIT: "sending DATA command",
    P.DATA_BLOCK: "sending message body",
    P.DATA_END: "sending end of data -- message may be sent more than once",
    P.RSET: "sending RSET",
    P.QUIT: "sending QUIT",
    P.READY: "waiting for the next command",
    P.CLOSED: "closing the session",
}
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")


#: Which `Timeouts` field bounds the reply awaited in a phase (any other phase: `helo`). Built
#: once: `for_phase` runs for every read and write of a delivery.
_TIMEOUT_FIELD = {
    P.GREETING: "greeting", P.STARTTLS: "starttls", P.TLS_HANDSHAKE: "starttls",
    P.MAIL: "mail", P.RCPT: "rcpt", P.DATA_INIT: "data_init", P.DATA_BLOCK: "data_block",
    P.DATA_END: "data_end", P.RSET: "rset", P.QUIT: "quit",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds per phase; defaults are RFC 5321 §4.5.3.2's minimums (Postfix's smtp_*_timeout)."""

    connect: float = 30.0
    greeting: float = 300.0  # §4.5.3.2.1 initial 220 message: 5 minutes
    helo: float = 300.0
    starttls: float = 300.0  # the STARTTLS reply and the handshake
    mail: float = 300.0  # §4.5.3.2.2: 5 minutes
    rcpt: float = 300.0  # §4.5.3.2.3: 5 minutes
    data_init: float = 120.0  # §4.5.3.2.4: 2 minutes
    data_block: float = 180.0  # §4.5.3.2.5: 3 minutes for each write of the body
    data_end: float = 600.0  # §4.5.3.2.6: 10 minutes
    rset: float = 20.0
    quit: float = 300.0

    def for_phase(self, phase: Phase) -> float:
        """The deadline for the reply awaited in `phase` (or for one body write)."""
        return float(getattr(self, _TIMEOUT_FIELD.get(phase, "helo")))


class StartTLSPolicy(enum.Enum):
    NEVER = "never"
    OPPORTUNISTIC = "opportunistic"  # STARTTLS when offered; clear text when not (RFC 7435)
    REQUIRED = "required"  # no TLS, no mail: fail the session with 4.7.4


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class MailTransaction:
    """One message to send: the envelope part the wire needs, and facts about the body."""

    sender: str
    recipients: tuple[RecipientSpec, ...]
    #: Octets on the wire, for SIZE= (RFC 1870); the stored size is a fair estimate.
    size: int | None = None
    #: Headers or addresses need SMTPUTF8 (RFC 6531); non-ASCII addresses imply it.
    smtputf8: bool = False
    #: The body has octets > 127 (BODY=8BITMIME, RFC 6152).
    body_8bit: bool = False
    dsn_ret: str | None = None
    dsn_envid: str | None = None

    @classmethod
    def from_envelope(
        cls, envelope: Envelope, recipients: tuple[str, ...], size: int | None
    ) -> MailTransaction:
        """Build from a queued envelope, keeping each recipient's DSN options."""
        specs = {r.address: r for r in envelope.recipients}
        return cls(
            sender=envelope.sender,
            recipients=tuple(specs.get(a) or RecipientSpec(a) for a in recipients),
            size=size,
            smtputf8=envelope.smtputf8,
            body_8bit=envelope.body_type.upper() in ("8BITMIME", "BINARYMIME"),
            dsn_ret=envelope.dsn_ret,
            dsn_envid=envelope.dsn_envid,
        )

    @property
    def needs_smtputf8(self) -> bool:
        addresses = [self.sender, *(r.address for r in self.recipients)]
        return self.smtputf8 or not all(a.isascii() for a in addresses)


class ReplyError(ValueError):
    """The peer's bytes are not an SMTP reply (RFC 5321 §4.2)."""


class ReplyReader:
    """Incremental reply parser: bytes in, `Reply` out, multi-line replies joined.

    Liberal in what it accepts from servers (a bare LF ends a line, a missing text is fine),
    strict in what it believes: lines are bounded, codes are three digits starting 2 to 5,
    and the lines of one reply share one code.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scan = 0  # no newline before this offset: never search the same bytes twice
        self._lines: list[str] = []
        self._code = 0

    def feed(self, data: bytes) -> None:
        self._buf += data

    def clear(self) -> None:
        self._buf.clear()
        self._scan = 0
        self._lines = []

    def next_reply(self, answered: str | None = None) -> Reply | None:
        """The next complete reply, or None until more bytes arrive; `answered` is stored in
        it (`Reply.answered`)."""
        while True:
            end = self._buf.find(b"\n", self._scan)
            if end < 0 or end >= MAX_REPLY_LINE_ACCEPTED:
                if len(self._buf) >= MAX_REPLY_LINE_ACCEPTED:
                    raise ReplyError(f"reply line longer than {MAX_REPLY_LINE_ACCEPTED} octets")
                self._scan = len(self._buf)
                return None
            line = bytes(self._buf[:end]).removesuffix(b"\r").decode("utf-8", "replace")
            del self._buf[: end + 1]
            self._scan = 0
            head = line[:3]
            if not (len(head) == 3 and head.isascii() and head.isdigit() and head[0] in "2345"):
                raise ReplyError(f"not a reply line: {line[:40]!r}")
            if line[3:4] not in ("", " ", "-"):
                raise ReplyError(f"bad separator in reply line: {line[:40]!r}")
            if self._lines and int(head) != self._code:
                raise ReplyError("reply lines with different codes")
            self._code = int(head)
            self._lines.append(line[4:])
            if len(self._lines) > MAX_REPLY_LINES:
                raise ReplyError(f"reply longer than {MAX_REPLY_LINES} lines")
            if line[3:4] != "-":
                lines, self._lines = self._lines, []
                return _make_reply(self._code, lines, answered)


def _make_reply(code: int, lines: list[str], answered: str | None = None) -> Reply:
    """Split off an RFC 3463 enhanced code whose class agrees with the reply code (RFC 2034)."""
    match = _ENHANCED.match(lines[0])
    if match is None or int(match[1]) != code // 100:
        return Reply(code, lines[0], None, tuple(lines[1:]), answered)
    enhanced = match[0].rstrip(" ")
    strip = [x[len(match[0]) :] if x.startswith(match[0]) else x for x in lines]
    return Reply(code, strip[0], enhanced, tuple(strip[1:]), answered)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What the peer's EHLO reply advertised (RFC 5321 §4.1.1.1); empty after HELO."""

    keywords: frozenset[str] = frozenset()
    #: SIZE (RFC 1870 §4): None when not advertised, 0 when advertised without a limit.
    size: int | None = None
    auth: frozenset[str] = frozenset()

    @classmethod
    def from_ehlo(cls, reply: Reply) -> Capabilities:
        keywords: set[str] = set()
        auth: set[str] = set()
        size: int | None = None
        for line in reply.more:
            words = line.upper().split()
            if not words:
                continue
            if words[0].startswith("AUTH="):  # the pre-RFC 4954 form some servers still send
                words = ["AUTH", words[0][5:], *words[1:]]
            keywords.add(words[0])
            if words[0] == "AUTH":
                auth.update(words[1:])
            elif words[0] == "SIZE":
                size = int(words[1]) if len(words) > 1 and words[1].isdigit() else 0
        return cls(frozenset(keywords), size, frozenset(auth))

    def has(self, keyword: str) -> bool:
        return keyword in self.keywords


def utf8_addr_xtext(value: str) -> str:
    """RFC 6533 §3 utf-8-addr-xtext: characters outside QCHAR become \\x{HEX}."""
    return "".join(
        c if "!" <= c <= "~" and c not in "+=\\" else f"\\x{{{ord(c):X}}}" for c in value
    )


def _mail_params(txn: MailTransaction, caps: Capabilities, utf8: bool) -> str:
    params = []
    if caps.size is not None and txn.size is not None:
        params.append(f"SIZE={txn.size}")
    if txn.body_8bit and caps.has("8BITMIME"):
        params.append("BODY=8BITMIME")
    if utf8:
        params.append("SMTPUTF8")
    if caps.has("DSN") and txn.dsn_ret and txn.dsn_ret.upper() in ("FULL", "HDRS"):
        params.append(f"RET={txn.dsn_ret.upper()}")
    if caps.has("DSN") and txn.dsn_envid:
        params.append(f"ENVID={xtext_encode(txn.dsn_envid)}")
    return "".join(" " + p for p in params)


def _rcpt_params(spec: RecipientSpec, caps: Capabilities) -> str:
    if not caps.has("DSN"):
        return ""
    params = []
    notify = [n.upper() for n in spec.notify if n.upper() in _NOTIFY]
    if notify:
        params.append("NOTIFY=" + ",".join(notify))
    if spec.orcpt is not None:
        kind, address = spec.orcpt
        if kind.lower() == "utf-8" or not address.isascii():  # RFC 6533 §3
            params.append(f"ORCPT=utf-8;{utf8_addr_xtext(address)}")
        else:
            params.append(f"ORCPT={xtext_encode(kind)};{xtext_encode(address)}")
    return "".join(" " + p for p in params)


def _refusal(txn: MailTransaction, caps: Capabilities) -> Reply | None:
    """Why this message cannot go to this peer at all, decided before sending anything."""
    if "\r" in txn.sender or "\n" in txn.sender or "\0" in txn.sender:
        return Reply(501, "bad sender address syntax", "5.1.7")
    if caps.size and txn.size is not None and txn.size > caps.size:
        why = f"message size {txn.size} exceeds size limit {caps.size} of server"
        return Reply(552, why, "5.3.4")
    if txn.needs_smtputf8 and not caps.has("SMTPUTF8"):
        return Reply(550, "SMTPUTF8 is required, but was not offered by host", "5.6.7")
    return None


def _bad_address(address: str) -> bool:
    """A CR, LF or NUL would end or split the command line: command injection."""
    return "\r" in address or "\n" in address or "\0" in address


@dataclass(slots=True)
class _Txn:
    """The transaction in flight (mutable, private): what was sent and what came back."""

    recipients: list[RecipientSpec]
    results: dict[str, Reply]  # decided without the peer (bad syntax)
    pipelined: bool
    mail: Reply | None = None
    rcpt: dict[str, Reply] = field(default_factory=dict)
    #: LMTP: each accepted recipient's own reply to the end of the message, as they come.
    data: dict[str, Reply] = field(default_factory=dict)
    rcpt_sent: int = 0

    @property
    def mail_ok(self) -> bool:
        return self.mail is not None and self.mail.is_success

    @property
    def accepted(self) -> bool:
        return self.mail_ok and any(r.is_success for r in self.rcpt.values())

    @property
    def accepted_addresses(self) -> list[str]:
        """The recipients whose RCPT succeeded, in the order sent (LMTP answers in this order)."""
        if not self.mail_ok:
            return []
        return [address for address, reply in self.rcpt.items() if reply.is_success]

    def outcome(self, final: Reply) -> dict[str, Reply]:
        """MAIL failure for all, else each RCPT failure, else the recipient's own end-of-data
        reply (LMTP), else the final (end-of-data) reply."""
        out = dict(self.results)
        for spec in self.recipients:
            rcpt = self.rcpt.get(spec.address)
            if self.mail is not None and not self.mail.is_success:
                out[spec.address] = self.mail
            elif rcpt is not None and not rcpt.is_success:
                out[spec.address] = rcpt
            elif spec.address in self.data:
                out[spec.address] = self.data[spec.address]
            else:
                out[spec.address] = final
        return out


def _temp(enhanced: str, text: str) -> Reply:
    """A reply we make up for a local decision: 4xx, so nothing bounces on our account."""
    return Reply(451, text, enhanced)


def soft_bounce(reply: Reply) -> Reply:
    """A refused AUTH as a temporary failure (454, RFC 4954 §6) that quotes the server's reply;
    the enhanced code keeps its detail with a 4 (5.7.8 -> 4.7.8)."""
    enhanced = "4" + reply.enhanced[1:] if reply.enhanced else "4.7.0"
    said = f"{reply.code} {reply.enhanced + ' ' if reply.enhanced else ''}{reply.text}"
    return Reply(454, f"SASL authentication failed; server said: {said}", enhanced)


class ClientConnection:
    """One SMTP client session as a pure state machine (see the module docstring).

    After a finished DATA the session is READY again at once; after an aborted transaction it
    sends RSET first and emits `Ready` on its 250. Once the events are drained, `next_event`
    answers `PAUSED` when it is the caller's turn and `NEED_DATA` when a reply is awaited.
    """

    def __init__(
        self,
        helo_name: str,
        *,
        starttls: StartTLSPolicy = StartTLSPolicy.OPPORTUNISTIC,
        credentials: Credentials | None = None,
        allow_plaintext_auth: bool = False,
        tls_active: bool = False,
        peer: str = "server",
        lmtp: bool = False,
    ) -> None:
        if not (
            helo_name.isascii() and helo_name.isprintable() and helo_name.split() == [helo_name]
        ):
            raise ValueError(f"bad HELO name: {helo_name!r}")
        self.helo_name = helo_name
        #: how our own failure texts name the peer: Postfix's `host[address]`
        self.peer = peer
        #: Speak LMTP (RFC 2033): LHLO, and one reply per accepted recipient after the body.
        self.lmtp = lmtp
        self.starttls_policy = starttls
        self.credentials = credentials
        self.allow_plaintext_auth = allow_plaintext_auth
        self.tls_active = tls_active  # True from the start for implicit TLS (port 465)
        self.capabilities = Capabilities()
        self.authenticated = False
        self._reader = ReplyReader()
        self._out = bytearray()
        self._events: deque[Event] = deque()
        self._pending: deque[Phase] = deque([P.GREETING])  # replies awaited, in order
        self._idle = P.READY  # the phase once no reply is awaited
        self._eof = False
        self._txn: _Txn | None = None
        self._login_step = 0
        self._body_bol = True  # the next body byte starts a line
        self._body_cr = False  # the last chunk ended in CR: CRLF or bare CR, decided later

    @property
    def phase(self) -> Phase:
        return self._pending[0] if self._pending else self._idle

    # -- the adapter's side --------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; b"" means it closed. Ignored between STARTTLS and tls_started."""
        if self.phase is P.TLS_HANDSHAKE:
            return
        if data:
            self._reader.feed(data)
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event | Wait:
        while not self._events:
            before = self.phase
            if before is P.CLOSED:
                return Closed()
            if not self._pending:
                return PAUSED
            try:
                phase = self._pending[0]
                got = self._reader.next_reply(_ANSWERED.get(phase, phase.value))
            except ReplyError as exc:
                self._lost(_temp("4.5.0", f"protocol error: {exc}"))
            else:
                if got is not None:
                    self._on_reply(got)
                elif self._eof:
                    self._lost(self._lost_reply(f"lost connection with {self.peer}"))
                else:
                    return NEED_DATA
            self._check(before)
        return self._events.popleft()

    def connection_lost(self, reason: str) -> None:
        """EOF, reset or timeout (`reason` says which): every open question gets a 4xx."""
        before = self.phase
        self._lost(self._lost_reply(reason))
        self._check(before)

    def tls_started(self) -> None:
        """The handshake succeeded: forget what was said in clear text and say EHLO again."""
        self._require(P.TLS_HANDSHAKE)
        self._reader.clear()
        self.tls_active = True
        self.capabilities = Capabilities()
        self._hello()
        self._check(P.TLS_HANDSHAKE)

    def tls_failed(self, reason: str, *, unverified: bool = False) -> None:
        """The handshake failed; `reason` is for the adapter's log, not for the DSN: Postfix
        reports only "Cannot start TLS: handshake failure", or "Server certificate not
        verified" when the certificate check failed (`unverified`)."""
        self._require(P.TLS_HANDSHAKE)
        if unverified:
            self._lost(_temp("4.7.5", "Server certificate not verified"))
        else:
            self._lost(_temp("4.7.5", "Cannot start TLS: handshake failure"))

    # -- the caller's side ---------------------------------------------------------------
    def start(self, txn: MailTransaction) -> None:
        """Begin a transaction; its outcome arrives as a TransactionDone event."""
        self._require(P.READY)
        specs = list({r.address: r for r in txn.recipients}.values())  # once per address
        bad = {s.address: Reply(501, "bad recipient address syntax", "5.1.3") for s in specs}
        valid = [s for s in specs if not _bad_address(s.address)]
        for spec in valid:
            del bad[spec.address]
        refusal = _refusal(txn, self.capabilities) if valid else None
        if refusal is not None or not valid:
            self._events.append(
                TransactionDone(bad | {s.address: refusal for s in valid if refusal})
            )
            return
        pipelined = self.capabilities.has("PIPELINING")
        self._txn = _Txn(valid, bad, pipelined)
        params = _mail_params(txn, self.capabilities, txn.needs_smtputf8)
        self._command(f"MAIL FROM:<{txn.sender}>{params}", P.MAIL)
        if pipelined:  # RFC 2920 §3.1: MAIL, every RCPT and DATA in one group
            while self._txn.rcpt_sent < len(valid):
                self._send_rcpt(self._txn)
            self._command("DATA", P.DATA_INIT)
        self._check(P.READY)

    def send_body(self, chunk: bytes) -> None:
        """Queue a body chunk: line ends become CRLF, a leading dot is doubled (RFC 5321 §4.5.2)."""
        self._require(P.DATA_BLOCK)
        if self._body_cr:
            chunk = b"\r" + chunk
        self._body_cr = chunk.endswith(b"\r")
        if self._body_cr:
            chunk = chunk[:-1]
        if not chunk:
            return
        chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        if self._body_bol and chunk.startswith(b"."):
            self._out += b"."
        self._out += chunk.replace(b"\r\n.", b"\r\n..")
        self._body_bol = chunk.endswith(b"\r\n")

    def end_body(self) -> None:
        """Finish the body: a missing final CRLF is added, then the lone "." line."""
        self._require(P.DATA_BLOCK)
        if self._body_cr or not self._body_bol:
            self._out += b"\r\n"
        self._out += b".\r\n"
        # LMTP (RFC 2033 §4.2): one reply for each recipient whose RCPT succeeded, in order
        due = len(self._txn.accepted_addresses) if self.lmtp and self._txn else 1
        self._pending.extend([P.DATA_END] * max(due, 1))

    def quit(self) -> None:
        """Say goodbye when idle; Closed follows the reply (or the peer's EOF)."""
        if self.phase is P.READY:
            self._command("QUIT", P.QUIT)
            self._idle = P.CLOSED

    # -- internals -------------------------------------------------------------------------
    def _require(self, phase: Phase) -> None:
        if self.phase is not phase:
            raise UsageError(f"expected phase {phase.name}, in {self.phase.name}")

    def _check(self, before: Phase) -> None:
        after = self.phase
        if after is not before and after not in TRANSITIONS[before]:
            raise AssertionError(f"illegal transition {before.name} -> {after.name}")

    def _hello(self) -> None:
        if self.lmtp:
            self._command("LHLO " + self.helo_name, P.LHLO)
        else:
            self._command("EHLO " + self.helo_name, P.EHLO)

    def _command(self, line: str, expect: Phase) -> None:
        self._out += line.encode("utf-8") + b"\r\n"
        self._pending.append(expect)

    def _settle(self, idle: Phase, event: Event) -> None:
        self._idle = idle
        self._events.append(event)

    def _fail(self, reply: Reply, phase: Phase) -> None:
        """A setup failure while the peer still listens: report it, then QUIT."""
        self._settle(P.CLOSED, SessionFailed(reply, phase))
        self._command("QUIT", P.QUIT)

    def _lost_reply(self, reason: str) -> Reply:
        """`reason` names what happened, e.g. "lost connection with mx[192.0.2.1]"."""
        return Reply(421, f"{reason} while {_DOING[self.phase]}", "4.4.2")

    def _lost(self, reply: Reply) -> None:
        phase = self.phase
        self._pending.clear()
        self._idle = P.CLOSED
        if self._txn is not None:
            self._events.append(TransactionDone(self._txn.outcome(reply)))
            self._txn = None
        elif phase in _SETUP or phase is P.RSET:
            self._events.append(SessionFailed(reply, phase))

    def _on_reply(self, reply: Reply) -> None:
        phase = self._pending[0]  # `reply.answered` names it (see `next_event`)
        if reply.code == 421 and phase is not P.QUIT:  # RFC 5321 §3.8: the peer is leaving
            self._lost(reply)
            return
        self._pending.popleft()
        match phase:
            case P.GREETING if reply.is_success:
                self._hello()
            case P.EHLO | P.LHLO if reply.is_success:
                self.capabilities = Capabilities.from_ehlo(reply)
                self._after_hello()
            case P.EHLO if reply.is_permanent:  # an old server: fall back to HELO
                self._command("HELO " + self.helo_name, P.HELO)
            case P.HELO if reply.is_success:
                self._after_hello()
            case P.GREETING | P.EHLO | P.HELO | P.LHLO:
                self._fail(reply, phase)
            case P.STARTTLS:
                self._on_starttls(reply)
            case P.AUTH:
                self._on_auth(reply)
            case P.MAIL | P.RCPT | P.DATA_INIT | P.DATA_END:
                self._on_transaction(phase, reply)
            case P.RSET if reply.is_success:
                self._settle(P.READY, Ready(self.capabilities))
            case P.RSET:
                self._fail(reply, phase)
            case P.QUIT:
                self._idle = P.CLOSED
            case P.TLS_HANDSHAKE | P.READY | P.DATA_BLOCK | P.CLOSED:
                raise AssertionError(f"no reply is awaited in {phase.name}")
            case _:
                assert_never(phase)

    def _after_hello(self) -> None:
        want_tls = self.starttls_policy is not StartTLSPolicy.NEVER and not self.tls_active
        if want_tls and self.capabilities.has("STARTTLS"):
            self._command("STARTTLS", P.STARTTLS)
        elif want_tls and self.starttls_policy is StartTLSPolicy.REQUIRED:
            self._fail(_temp("4.7.4", "TLS is required, but was not offered by host"), P.EHLO)
        else:
            self._after_tls()

    def _on_starttls(self, reply: Reply) -> None:
        if reply.code == 220:
            self._reader.clear()  # clear text after the 220 is never read (CVE-2011-0411)
            self._settle(P.TLS_HANDSHAKE, StartTLS())
        elif self.starttls_policy is StartTLSPolicy.REQUIRED:
            why = f"TLS is required, but STARTTLS was refused: {reply.one_line()}"
            self._fail(_temp("4.7.4", why), P.STARTTLS)
        else:  # opportunistic: carry on in clear text (RFC 7435 §3)
            self._after_tls()

    def _after_tls(self) -> None:
        creds = self.credentials
        if creds is None or self.authenticated:
            self._settle(P.READY, Ready(self.capabilities))
        elif not (self.tls_active or self.allow_plaintext_auth):
            self._fail(_temp("4.7.0", "refusing to send credentials without TLS"), P.AUTH)
        elif "PLAIN" in self.capabilities.auth:  # RFC 4616, with the initial response
            token = base64.b64encode(f"\0{creds.username}\0{creds.password}".encode())
            self._login_step = 2  # no challenge is expected
            self._command("AUTH PLAIN " + token.decode("ascii"), P.AUTH)
        elif "LOGIN" in self.capabilities.auth:  # draft-murchison-sasl-login: two challenges
            self._login_step = 0
            self._command("AUTH LOGIN", P.AUTH)
        else:
            self._fail(_temp("4.7.0", "no supported AUTH mechanism offered"), P.AUTH)

    def _on_auth(self, reply: Reply) -> None:
        creds = self.credentials
        assert creds is not None
        if reply.code == 334 and self._login_step < 2:
            secret = (creds.username, creds.password)[self._login_step]
            self._login_step += 1
            self._command(base64.b64encode(secret.encode()).decode("ascii"), P.AUTH)
        elif reply.code == 334:  # one challenge too many: cancel (RFC 4954 §4)
            self._command("*", P.AUTH)
        elif reply.is_success:
            self.authenticated = True
            self._settle(P.READY, Ready(self.capabilities))
        elif reply.is_permanent:
            # Refused credentials are our configuration problem, not the recipients': defer
            # rather than bounce every message (Postfix smtp_sasl_auth_soft_bounce = yes).
            self._fail(soft_bounce(reply), P.AUTH)
        else:
            self._fail(reply, P.AUTH)

    def _send_rcpt(self, txn: _Txn) -> None:
        spec = txn.recipients[txn.rcpt_sent]
        txn.rcpt_sent += 1
        self._command(f"RCPT TO:<{spec.address}>{_rcpt_params(spec, self.capabilities)}", P.RCPT)

    def _on_transaction(self, phase: Phase, reply: Reply) -> None:
        txn = self._txn
        assert txn is not None
        match phase:
            case P.MAIL:
                txn.mail = reply
                if not txn.pipelined and reply.is_success:
                    self._send_rcpt(txn)
                elif not txn.pipelined:
                    self._finish(txn, reply, rset=False)
            case P.RCPT:
                txn.rcpt[txn.recipients[len(txn.rcpt)].address] = reply
                if txn.pipelined:
                    return
                if txn.rcpt_sent < len(txn.recipients):
                    self._send_rcpt(txn)
                elif txn.accepted:
                    self._command("DATA", P.DATA_INIT)
                else:
                    self._finish(txn, reply, rset=True)
            case P.DATA_INIT if reply.code == 354 and txn.accepted:
                self._body_bol, self._body_cr = True, False
                self._settle(P.DATA_BLOCK, SendBody())
            case P.DATA_INIT if reply.code == 354:  # RFC 2920 §3.1: nobody to send it to
                self._out += b".\r\n"
                self._pending.append(P.DATA_END)
            case P.DATA_INIT if reply.is_success:
                # No body went out, so this is no delivery; and the peer's state is unknown
                # (it may be reading a body), so nothing more is said: hang up.
                why = f"protocol error: {reply.one_line()} in reply to DATA, expected 354"
                self._lost(_temp("4.5.0", why))
            case P.DATA_INIT:
                self._finish(txn, reply, rset=txn.mail_ok)
            case P.DATA_END if self.lmtp and len(txn.data) + 1 < len(txn.accepted_addresses):
                txn.data[txn.accepted_addresses[len(txn.data)]] = reply  # more are due
            case P.DATA_END:
                if self.lmtp and txn.accepted_addresses:
                    txn.data[txn.accepted_addresses[len(txn.data)]] = reply
                self._finish(txn, reply, rset=False)
            case _:
                raise AssertionError(f"not a transaction phase: {phase.name}")

    def _finish(self, txn: _Txn, final: Reply, *, rset: bool) -> None:
        self._txn = None
        self._settle(P.READY, TransactionDone(txn.outcome(final)))
        if rset:
            self._command("RSET", P.RSET)
