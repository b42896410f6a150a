"""The milter protocol, MTA side (Sendmail/Postfix milter protocol version 6), sans-I/O.

In: calls for each SMTP stage (`connect`, `helo`, `mail`, `rcpt`, `data`, `header`, `eoh`,
`body`, `end_of_message`, `abort`, `quit`) and the bytes the milter sent (`receive_data`).
Out: the bytes to write (`data_to_send`) and events (`next_event`, the frozen dataclasses of
`proto.milter_events`): `Negotiated`, one `Verdict` per command that expects a reply, the message
edits a milter asks for at end of message (`AddHeader` ... `Quarantine`), `Progress`, and
`Failed` when the milter broke the protocol. With no event ready, `next_event` returns a
`proto.sansio.Wait`, as the other cores do: NEED_DATA while a reply is owed, PAUSED when none is.

Framing (libmilter's mfdef.h): every packet is a 4-byte big-endian length (the command byte
included), one command byte, then its data; strings are NUL-terminated.

Pipelining: a command the milter negotiated away (`SMFIP_NO*`) is not sent at all and its
verdict is `continue` at once; a command it said needs no reply (`SMFIP_NR_*`) is sent without
waiting. Replies come in command order, so a caller may send several commands (headers, body
chunks, end of message) in one write and read their verdicts afterwards: `pending` says how
many replies are still owed. A milter that accepts, rejects, tempfails or discards the message
before its end (at DATA, a header, end of headers or a body chunk) has left it: libmilter
ignores that message's later commands and answers none of them, so none is owed (Postfix,
which waits for each reply, never sends them). The exception follows libmilter's state table:
a milter that negotiated away both MAIL and RCPT re-enters the message and answers the rest.

Invariants: a `Verdict` is produced only for a command that owed one, in order; message edits are
accepted only while end of message is pending and only those the milter negotiated; a body
replacement larger than `max_body` is a protocol failure (the caller's message size limit
bounds memory and disk, whatever the milter asks). After `Failed` the connection is unusable
and every later call is ignored.

SECURITY: everything the milter sends is untrusted: lengths are checked against `MAX_PACKET`
before anything is buffered past it, strings must be NUL-terminated and decodable, reply codes
must be 4xx/5xx. Header names and values from a milter are checked in `proto.milter_edit`
before they reach a message.
"""

from __future__ import annotations

import enum
import re
import struct
from collections import deque
from collections.abc import Iterable, Mapping

from mailhaven.proto.milter_events import (
    AddHeader,
    AddRecipient,
    ChangeFrom,
    ChangeHeader,
    DeleteRecipient,
    Edit,
    Event,
    Failed,
    InsertHeader,
    Negotiated,
    Progress,
    Quarantine,
    ReplaceBody,
    Verdict,
)
from mailhaven.proto.replies import Reply
from mailhaven.proto.sansio import NEED_DATA, PAUSED, Wait

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "Action",
    "AddHeader",
    "AddRecipient",
    "ChangeFrom",
    "ChangeHeader",
    "DeleteRecipient",
    "Edit",
    "Event",
    "Failed",
    "InsertHeader",
    "MilterConnection",
    "Negotiated",
    "Progress",
    "ProtocolError",
    "Quarantine",
    "ReplaceBody",
    "Stage",
    "Verdict",
    "Wait",
    "packet",
    "parse_reply_code",
]

#: The protocol version we speak (Postfix 2.6+ and Sendmail 8.14+ speak 6).
VERSION = 6
#: Oldest version we accept from a milter (libmilter's SMFI_PROT_VERSION_MIN is 2).
MIN_VERSION = 2
#: libmilter's MILTER_CHUNK_SIZE: the largest SMFIC_BODY chunk unless SMFIP_MDS_* is agreed.
CHUNK_SIZE = 65535
#: The largest packet we accept from a milter: a 1 MiB body chunk (SMFIP_MDS_1M) plus framing.
MAX_PACKET = 1024 * 1024 + 64

# Actions a milter may take (SMFIF_*, mfapi.h).
SMFIF_ADDHDRS = 0x01
SMFIF_CHGBODY = 0x02
SMFIF_ADDRCPT = 0x04
SMFIF_DELRCPT = 0x08
SMFIF_CHGHDRS = 0x10
SMFIF_QUARANTINE = 0x20
SMFIF_CHGFROM = 0x40
SMFIF_ADDRCPT_PAR = 0x80
SMFIF_SETSYMLIST = 0x100
ALL_ACTIONS = 0x1FF

# Protocol options (SMFIP_*, mfdef.h): what the milter does not want, or need not answer.
SMFIP_NOCONNECT = 0x1
SMFIP_NOHELO = 0x2
SMFIP_NOMAIL = 0x4
SMFIP_NORCPT = 0x8
SMFIP_NOBODY = 0x10
SMFIP_NOHDRS = 0x20
SMFIP_NOEOH = 0x40
SMFIP_NR_HDR = 0x80
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_SKIP = 0x400
SMFIP_RCPT_REJ = 0x800
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
SMFIP_HDR_LEADSPC = 0x100000
SMFIP_MDS_256K = 0x10000000
SMFIP_MDS_1M = 0x20000000
#: What we offer: everything but SMFIP_RCPT_REJ (we do not show milters rejected recipients).
OFFERED_PROTOCOL = 0x1FF7FF | SMFIP_MDS_256K | SMFIP_MDS_1M


class Stage(enum.Enum):
    """A command that may owe a reply; the value is how Postfix names it in its logs."""

    NEGOTIATE = "OPTNEG"
    CONNECT = "CONNECT"
    HELO = "HELO"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    HEADER = "HEADER"
    EOH = "END-OF-HEADERS"
    BODY = "BODY"
    EOM = "END-OF-MESSAGE"
    UNKNOWN = "UNKNOWN"


#: stage -> (command byte, the SMFIP_NO* bit, the SMFIP_NR_* bit, the SMFIM_* macro stage)
_COMMANDS: dict[Stage, tuple[bytes, int, int, int | None]] = {
    Stage.CONNECT: (b"C", SMFIP_NOCONNECT, SMFIP_NR_CONN, 0),
    Stage.HELO: (b"H", SMFIP_NOHELO, SMFIP_NR_HELO, 1),
    Stage.MAIL: (b"M", SMFIP_NOMAIL, SMFIP_NR_MAIL, 2),
    Stage.RCPT: (b"R", SMFIP_NORCPT, SMFIP_NR_RCPT, 3),
    Stage.DATA: (b"T", SMFIP_NODATA, SMFIP_NR_DATA, 4),
    Stage.HEADER: (b"L", SMFIP_NOHDRS, SMFIP_NR_HDR, None),
    Stage.EOH: (b"N", SMFIP_NOEOH, SMFIP_NR_EOH, 6),
    Stage.BODY: (b"B", SMFIP_NOBODY, SMFIP_NR_BODY, None),
    Stage.EOM: (b"E", 0, 0, 5),
    Stage.UNKNOWN: (b"U", SMFIP_NOUNKNOWN, SMFIP_NR_UNKN, None),
}


#: the stages sent together at end of data (DATA, headers, EOH, body chunks, EOM)
_MESSAGE = frozenset({Stage.DATA, Stage.HEADER, Stage.EOH, Stage.BODY, Stage.EOM})


class Action(enum.Enum):
    CONTINUE = "continue"
    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    DISCARD = "discard"
    SKIP = "skip"
    #: SMFIR_CONN_FAIL: fail the SMTP connection (421)
    CONN_FAIL = "connfail"
    #: SMFIR_SHUTDOWN: the milter is going away
    SHUTDOWN = "shutdown"


#: verdicts after which a libmilter milter ignores the rest of the message (engine.c: its
#: state goes back to HELO, from where DATA/header/EOH/body/EOM are not valid commands)
_LEAVES_MESSAGE = frozenset({Action.ACCEPT, Action.REJECT, Action.TEMPFAIL, Action.DISCARD})

_ACTIONS = {
    b"c": Action.CONTINUE,
    b"a": Action.ACCEPT,
    b"r": Action.REJECT,
    b"t": Action.TEMPFAIL,
    b"d": Action.DISCARD,
    b"s": Action.SKIP,
    b"f": Action.CONN_FAIL,
    b"4": Action.SHUTDOWN,
}


#: reply byte -> the action flag it needs
_EDIT_FLAGS = {
    b"h": SMFIF_ADDHDRS,
    b"i": SMFIF_ADDHDRS,
    b"m": SMFIF_CHGHDRS,
    b"b": SMFIF_CHGBODY,
    b"e": SMFIF_CHGFROM,
    b"+": SMFIF_ADDRCPT,
    b"2": SMFIF_ADDRCPT_PAR,
    b"-": SMFIF_DELRCPT,
    b"q": SMFIF_QUARANTINE,
}


class ProtocolError(ValueError):
    """What the milter sent breaks the protocol (turned into `Failed`)."""


def packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + command + data


def _cstrings(*values: str) -> bytes:
    return b"".join(v.encode("utf-8", "surrogateescape") + b"\0" for v in values)


def _split_strings(data: bytes, count: int | None = None) -> list[str]:
    """NUL-terminated strings; `count`: exactly that many (the rest must be empty)."""
    if not data.endswith(b"\0"):
        raise ProtocolError("string not NUL-terminated")
    parts = data[:-1].split(b"\0")
    if count is not None and len(parts) != count:
        raise ProtocolError(f"expected {count} strings, got {len(parts)}")
    try:
        return [p.decode("utf-8") for p in parts]
    except UnicodeDecodeError:
        raise ProtocolError("string is not UTF-8") from None


#: RFC 5322 §3.6.8: a field name is printable US-ASCII except colon.
_FIELD_NAME = re.compile(r"[!-9;-~]+\Z")


def _check_field_name(name: str) -> None:
    if not _FIELD_NAME.match(name):
        raise ProtocolError(f"bad header field name {name[:40]!r}")


def parse_reply_code(text: str) -> Reply:
    """SMFIR_REPLYCODE's text ("550 5.7.1 go away", lines joined by CRLF) as a `Reply`."""
    lines = text.replace("\r\n", "\n").rstrip("\n").split("\n")
    code = lines[0][:3]
    if not (code.isdigit() and code[0] in "45") or (len(lines[0]) > 3 and lines[0][3] not in " -"):
        raise ProtocolError(f"bad reply code {text[:40]!r}")
    texts: list[str] = []
    enhanced: str | None = None
    for line in lines:
        if line[:3] != code:
            raise ProtocolError(f"reply lines disagree: {text[:40]!r}")
        rest = line[4:]
        word, _, after = rest.partition(" ")
        parts = word.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts) and word[0] == code[0]:
            enhanced = enhanced or word
            rest = after
        texts.append(rest)
    return Reply(int(code), texts[0], enhanced, tuple(texts[1:]))


def _macro_payload(stage_byte: bytes, macros: Mapping[str, str], wanted: Iterable[str] | None) -> bytes:
    names = macros.keys() if wanted is None else [n for n in wanted if n in macros]
    body = b"".join(_cstrings(name, macros[name]) for name in names)
    return packet(b"D", stage_byte + body)


class MilterConnection:
    """One connection to one milter (see the module docstring)."""

    def __init__(
        self,
        *,
        actions: int = ALL_ACTIONS,
        protocol: int = OFFERED_PROTOCOL,
        max_body: int = 36 * 1024 * 1024,
    ) -> None:
        self.offered_actions = actions
        self.offered_protocol = protocol
        self.max_body = max_body
        self.actions = 0
        self.protocol = 0
        self.version = 0
        self.macros: dict[int, tuple[str, ...]] = {}
        self.failed: str | None = None
        self._out = bytearray()
        self._in = bytearray()
        self._pending: deque[Stage] = deque()
        self._events: deque[Event] = deque()
        self._replaced = 0
        #: the milter left the current message early: its later message commands owe nothing
        self._left_message = False

    # ------------------------------------------------------------------ state

    @property
    def pending(self) -> int:
        """Replies the milter still owes."""
        return len(self._pending)

    @property
    def negotiated(self) -> bool:
        return self.version != 0

    @property
    def chunk_size(self) -> int:
        """The largest body chunk this milter takes."""
        if self.protocol & SMFIP_MDS_1M:
            return 1024 * 1024
        if self.protocol & SMFIP_MDS_256K:
            return 256 * 1024
        return CHUNK_SIZE

    @property
    def unsent(self) -> int:
        """Bytes queued for the milter and not yet taken by `data_to_send`."""
        return len(self._out)

    @property
    def has_events(self) -> bool:
        return bool(self._events)

    def wants(self, stage: Stage) -> bool:
        """Whether the milter asked to see `stage` at all."""
        return not self.protocol & _COMMANDS[stage][1]

    def owes_reply(self, stage: Stage) -> bool:
        """Whether sending `stage` now would owe a reply (it is wanted and not SMFIP_NR_*)."""
        _, no_bit, nr_bit, _ = _COMMANDS[stage]
        return self.failed is None and not self.protocol & (no_bit | nr_bit)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    # ------------------------------------------------------------------ commands

    def negotiate(self) -> None:
        self._out += packet(
            b"O", struct.pack(">III", VERSION, self.offered_actions, self.offered_protocol)
        )
        self._pending.append(Stage.NEGOTIATE)

    def _command(self, stage: Stage, data: bytes, macros: Mapping[str, str] | None) -> bool:
        """Queue one stage's command (and its macros); True when a reply is owed."""
        if self.failed is not None:
            return False
        byte, no_bit, nr_bit, macro_stage = _COMMANDS[stage]
        if stage is Stage.MAIL:
            self._left_message = False  # a new transaction, even if MAIL itself is not sent
        if self.protocol & no_bit:
            return False
        if macros and self.version >= 2 and macro_stage is not None:
            self._out += _macro_payload(byte, macros, self.macros.get(macro_stage))
        self._out += packet(byte, data)
        if self.protocol & nr_bit or (self._left_message and stage in _MESSAGE):
            return False
        self._pending.append(stage)
        return True

    def connect(
        self,
        hostname: str,
        address: str,
        port: int,
        macros: Mapping[str, str] | None = None,
    ) -> bool:
        """SMFIC_CONNECT. `address` "" means unknown, a path a UNIX socket; else IPv4/IPv6."""
        if not address:
            data = _cstrings(hostname) + b"U"
        elif address.startswith("/"):
            data = _cstrings(hostname) + b"L" + struct.pack(">H", 0) + _cstrings(address)
        else:
            family = b"6" if ":" in address else b"4"
            data = _cstrings(hostname) + family + struct.pack(">H", port) + _cstrings(address)
        return self._command(Stage.CONNECT, data, macros)

    def helo(self, name: str, macros: Mapping[str, str] | None = None) -> bool:
        return self._command(Stage.HELO, _cstrings(name), macros)

    def mail(self, sender: str, args: Iterable[str] = (), macros: Mapping[str, str] | None = None) -> bool:
        return self._command(Stage.MAIL, _cstrings(f"<{sender}>", *args), macros)

    def rcpt(self, rcpt: str, args: Iterable[str] = (), macros: Mapping[str, str] | None = None) -> bool:
        return self._command(Stage.RCPT, _cstrings(f"<{rcpt}>", *args), macros)

    def data(self, macros: Mapping[str, str] | None = None) -> bool:
        return self._command(Stage.DATA, b"", macros) if self.version >= 4 else False

    def unknown(self, line: str) -> bool:
        return self._command(Stage.UNKNOWN, _cstrings(line), None) if self.version >= 3 else False

    def header(self, name: str, value: str) -> bool:
        if not self.protocol & SMFIP_HDR_LEADSPC:
            value = value.lstrip(" \t")
        return self._command(Stage.HEADER, _cstrings(name, value), None)

    def eoh(self, macros: Mapping[str, str] | None = None) -> bool:
        return self._command(Stage.EOH, b"", macros)

    def body(self, chunk: bytes) -> bool:
        """One body chunk; the caller splits at `chunk_size`."""
        if len(chunk) > self.chunk_size:
            raise ValueError("body chunk larger than the negotiated size")
        return self._command(Stage.BODY, chunk, None)

    def end_of_message(self, macros: Mapping[str, str] | None = None) -> bool:
        self._replaced = 0
        return self._command(Stage.EOM, b"", macros)

    def abort(self) -> None:
        """SMFIC_ABORT: the transaction ends (RSET, a reject); no reply. Replies still owed
        for earlier commands are still read."""
        if self.failed is None:
            self._out += packet(b"A")

    def quit_new_connection(self) -> None:
        """SMFIC_QUIT_NC (version 6): this SMTP session is over, another one follows on the
        same milter connection, without a new option negotiation."""
        if self.failed is None:
            self._out += packet(b"K")

    def quit(self) -> None:
        if self.failed is None:
            self._out += packet(b"Q")

    # ------------------------------------------------------------------ replies

    def receive_data(self, data: bytes) -> None:
        if self.failed is not None:
            return
        if not data:
            self._fail("milter closed the connection")
            return
        self._in += data
        try:
            self._parse()
        except ProtocolError as err:
            self._fail(str(err))

    def next_event(self) -> Event | Wait:
        """The next event; else NEED_DATA while the milter owes a reply, PAUSED when it owes
        none (nothing to read: the caller's turn; also for good after `Failed`)."""
        if self._events:
            return self._events.popleft()
        return NEED_DATA if self._pending else PAUSED

    def _fail(self, reason: str) -> None:
        if self.failed is None:
            self.failed = reason
            self._pending.clear()
            self._in.clear()
            self._events.append(Failed(reason))

    def _parse(self) -> None:
        while len(self._in) >= 4:
            (length,) = struct.unpack_from(">I", self._in)
            if length < 1 or length > MAX_PACKET:
                raise ProtocolError(f"bad packet length {length}")
            if len(self._in) < 4 + length:
                return
            command = bytes(self._in[4:5])
            data = bytes(self._in[5 : 4 + length])
            del self._in[: 4 + length]
            self._reply(command, data)
            if self.failed is not None:
                return

    def _reply(self, command: bytes, data: bytes) -> None:
        if not self._pending:
            raise ProtocolError(f"unexpected reply {command!r}")
        stage = self._pending[0]
        if stage is Stage.NEGOTIATE:
            if command != b"O":
                raise ProtocolError(f"expected option negotiation, got {command!r}")
            self._pending.popleft()
            self._events.append(self._negotiated(data))
            return
        if command == b"p":
            self._events.append(Progress())
            return
        if command in _EDIT_FLAGS:
            if stage is not Stage.EOM:
                raise ProtocolError(f"edit {command!r} outside end of message")
            if not self.actions & _EDIT_FLAGS[command]:
                raise ProtocolError(f"edit {command!r} not negotiated")
            self._events.append(self._edit(command, data))
            return
        if command == b"y":
            reply = parse_reply_code(_split_strings(data, 1)[0])
            action = Action.TEMPFAIL if reply.code < 500 else Action.REJECT
            self._pending.popleft()
            self._events.append(Verdict(stage, action, reply))
            self._maybe_left_message(stage, action)
            return
        known = _ACTIONS.get(command)
        if known is None:
            raise ProtocolError(f"unknown reply {command!r}")
        action = known
        if action is Action.SKIP and not (stage is Stage.BODY and self.protocol & SMFIP_SKIP):
            raise ProtocolError("skip outside a body chunk")
        self._pending.popleft()
        self._events.append(Verdict(stage, action))
        self._maybe_left_message(stage, action)

    def _maybe_left_message(self, stage: Stage, action: Action) -> None:
        # libmilter's trans_ok(): from HELO a message command is reachable only by skipping
        # the MAIL and RCPT states, i.e. when both were negotiated away
        skips_envelope = self.protocol & SMFIP_NOMAIL and self.protocol & SMFIP_NORCPT
        if (
            stage in _MESSAGE
            and stage is not Stage.EOM
            and action in _LEAVES_MESSAGE
            and not skips_envelope
        ):
            self._left_message = True
            self._pending = deque(s for s in self._pending if s not in _MESSAGE)

    def _negotiated(self, data: bytes) -> Negotiated:
        if len(data) < 12:
            raise ProtocolError("short option negotiation")
        version, actions, protocol = struct.unpack_from(">III", data)
        if not version >= MIN_VERSION:
            raise ProtocolError(f"milter protocol version {version} not supported")
        if actions & ~self.offered_actions:
            raise ProtocolError(f"milter wants actions 0x{actions:x} beyond 0x{self.offered_actions:x}")
        if protocol & ~self.offered_protocol:
            raise ProtocolError(
                f"milter wants protocol options 0x{protocol:x} beyond 0x{self.offered_protocol:x}"
            )
        macros: dict[int, tuple[str, ...]] = {}
        rest = data[12:]
        while rest:
            if len(rest) < 5:
                raise ProtocolError("short macro list")
            (where,) = struct.unpack_from(">I", rest)
            end = rest.find(b"\0", 4)
            if end < 0 or where > 6:
                raise ProtocolError("bad macro list")
            names = rest[4:end].decode("ascii", "replace").replace(",", " ").split()
            macros[where] = tuple(names)
            rest = rest[end + 1 :]
        self.version = min(version, VERSION)
        self.actions, self.protocol, self.macros = actions, protocol, macros
        return Negotiated(self.version, actions, protocol, macros)

    def _edit(self, command: bytes, data: bytes) -> Edit:
        match command:
            case b"h":
                name, value = _split_strings(data, 2)
                _check_field_name(name)
                return AddHeader(name, value)
            case b"i" | b"m":
                if len(data) < 4:
                    raise ProtocolError("short header edit")
                (index,) = struct.unpack_from(">I", data)
                name, value = _split_strings(data[4:], 2)
                _check_field_name(name)
                if command == b"i":
                    return InsertHeader(index, name, value)
                return ChangeHeader(index, name, value)
            case b"b":
                self._replaced += len(data)
                if self._replaced > self.max_body:
                    raise ProtocolError(f"replacement body exceeds {self.max_body} bytes")
                return ReplaceBody(data)
            case b"e" | b"+" | b"2":
                strings = _split_strings(data)
                if not 1 <= len(strings) <= 2:
                    raise ProtocolError("bad address edit")
                address = strings[0].strip()
                if address.startswith("<") and address.endswith(">"):
                    address = address[1:-1]
                args = strings[1] if len(strings) > 1 else ""
                return ChangeFrom(address, args) if command == b"e" else AddRecipient(address, args)
            case b"-":
                address = _split_strings(data, 1)[0].strip()
                if address.startswith("<") and address.endswith(">"):
                    address = address[1:-1]
                return DeleteRecipient(address)
            case _:  # b"q"
                return Quarantine(_split_strings(data, 1)[0])
