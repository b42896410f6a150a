"""The SMTP server protocol core, sans-I/O (RFC 5321 with PIPELINING, CHUNKING, DSN, SMTPUTF8).

Bytes in (`receive_data`), events out (`next_event`), replies out (`data_to_send`). No sockets,
clocks or files: the asyncio adapter in `mailhaven.smtpd` moves bytes and answers decisions.

The core decides what is *legal*: syntax, command order, limits, PIPELINING rules, body framing.
The application decides what is *welcome*: it answers each decision event with `accept()` (the
standard positive reply) or `respond(reply)`. While a decision is outstanding the core reads no
further input, so pipelined commands are answered strictly in order (RFC 2920 §3.2).

Security properties kept here, once, for every listener:
- one framing rule for DATA and BDAT (see `proto.body`): bare CR/LF taints a message, which is
  then rejected; the end of data is only CRLF.CRLF;
- a BDAT chunk is always consumed by its declared size, even when refused, so its bytes can
  never be read as commands; an unparsable BDAT size ends the session;
- after STARTTLS all buffered plaintext is dropped (CVE-2011-0411) and the EHLO state forgotten;
- a client that talks before the greeting or pipelines past a command that must end a group
  (RFC 2920 §3.1) is disconnected when `forbid_unauth_pipelining` is on (Postfix 3.9 default);
- NUL, bare CR and 8-bit octets in commands (without SMTPUTF8) are refused;
- after `hard_error_limit` error replies the session ends with 421.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from mailhaven.proto import smtp_events as ev
from mailhaven.proto.address import (
    AddressError,
    MailParams,
    parse_mail_params,
    parse_path,
    parse_rcpt_params,
)
from mailhaven.proto.body import DotDecoder, has_bare_newline
from mailhaven.proto.replies import Reply
from mailhaven.proto.smtp_help import HELP_TEXT, OBSOLETE, ORDER

#: RFC 5321 §4.5.3.1.4: a command line is at most 512 octets with CRLF.
MAX_COMMAND_LINE = 512
#: RFC 3461 §5 and RFC 4954 §5 lengthen MAIL by ENVID (100) and AUTH= (500).
MAIL_LINE_EXTRA = 600
#: RFC 3461 §5: ORCPT lengthens RCPT by 500.
RCPT_LINE_EXTRA = 500
#: RFC 4954 §4: an AUTH line (command or response) may be 12288 octets.
MAX_AUTH_LINE = 12288
#: RFC 5321 §4.5.3.1.8: at least 100 recipients must be accepted (Postfix: 1000).
MIN_RECIPIENTS = 100
#: Postfix's smtpd_recipient_overshoot_limit: recipients past the limit answered 452 before
#: each further one counts as an error (a client legitimately pipelines a big batch).
RECIPIENT_OVERSHOOT = 1000
#: Commands after which a client must wait for the reply (RFC 2920 §3.1, RFC 3207, RFC 4954).
_GROUP_ENDERS = frozenset(
    {"EHLO", "HELO", "DATA", "VRFY", "EXPN", "NOOP", "HELP", "ETRN", "AUTH", "STARTTLS"}
)


class Wait(enum.Enum):
    NEED_DATA = "NEED_DATA"
    PAUSED = "PAUSED"


NEED_DATA = Wait.NEED_DATA
#: A decision event is outstanding: answer it before asking for the next event.
PAUSED = Wait.PAUSED


class Phase(enum.Enum):
    GREETING = "greeting"
    COMMAND = "command"
    DATA = "data"
    BDAT = "bdat"
    AUTH = "auth"
    STARTTLS = "starttls"
    CLOSED = "closed"


class ProtocolUsageError(RuntimeError):
    """The application called the core out of turn (a bug in the caller, not the client)."""


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """What this listener offers and its limits (each overridable from configuration)."""

    hostname: str = "localhost"
    banner: str = "ESMTP mailhaven"
    max_message_size: int = 36_700_160
    max_recipients: int = 1000
    command_line_limit: int = MAX_COMMAND_LINE
    hard_error_limit: int = 20
    enhanced_status_codes: bool = True
    pipelining: bool = True
    chunking: bool = True
    dsn: bool = True
    smtputf8: bool = True
    eightbitmime: bool = True
    #: A certificate is configured: offer STARTTLS.
    starttls: bool = False
    #: The connection is already TLS (implicit TLS listener, RFC 8314).
    tls_on_connect: bool = False
    auth_mechanisms: tuple[str, ...] = ()
    auth_requires_tls: bool = True
    etrn: bool = False
    forbid_unauth_pipelining: bool = True
    #: Commands in one session before 421 (a runaway or abusive client; 0: no limit).
    max_commands: int = 10_000


def _r(code: int, enhanced: str | None, text: str) -> Reply:
    return Reply(code, text, enhanced)


OK = _r(250, "2.0.0", "Ok")
SENDER_OK = _r(250, "2.1.0", "Ok")
RECIPIENT_OK = _r(250, "2.1.5", "Ok")
BAD_SEQUENCE_HELO = _r(503, "5.5.1", "Error: send HELO/EHLO first")
SYNC_ERROR = _r(554, "5.5.0", "Error: SMTP protocol synchronization")


class ServerConnection:
    """One SMTP session's protocol state. Not thread-safe; one per connection."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.phase = Phase.GREETING
        self.tls = settings.tls_on_connect
        self.helo: str | None = None
        self.extended = False
        self.authenticated: str | None = None
        self.mail: ev.MailFrom | None = None
        self.recipients: list[ev.RcptTo] = []
        self.error_count = 0
        self.command_count = 0
        #: Postfix-style per-command statistics for the disconnect log: name -> [ok, total].
        self.stats: dict[str, list[int]] = {}
        self._in = bytearray()
        self._out = bytearray()
        self._events: deque[ev.Event] = deque()
        self._pending: ev.Event | None = None
        self._pending_cmd = ""
        self._discarding_line = False
        #: The start of the overlong line being skipped (see `_read_line`).
        self._discarded = b""
        self._early_input = False
        self._decoder: DotDecoder | None = None
        self._body_size = 0
        self._body_error: Reply | None = None
        self._bdat_remaining = 0
        self._bdat_last = False
        self._bdat_cr = False
        self._bdat_active = False
        self._bdat_refusal: Reply | None = None
        self._overshoot = 0
        #: Asked when a body is about to start (DATA, first BDAT chunk): a refusal such as
        #: `452 4.3.1` (spool full) is sent instead of 354 / instead of taking the chunk.
        self.data_gate: Callable[[], Reply | None] | None = None
        self._advertised: frozenset[str] = frozenset()
        self._advertised_for: tuple[bool, bool] | None = None

    # ------------------------------------------------------------------ bytes in / out

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the client; `b""` means the client closed its side."""
        if self.phase is Phase.CLOSED:
            return
        if not data:
            self._close("lost connection")
            return
        if self.phase is Phase.GREETING:
            self._early_input = True
        if self.phase is Phase.STARTTLS:
            return  # plaintext after STARTTLS: dropped, never interpreted (CVE-2011-0411)
        self._in += data

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def has_output(self) -> bool:
        """Replies are waiting for `data_to_send` (the session made progress)."""
        return bool(self._out)

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    @property
    def awaiting_decision(self) -> bool:
        """A decision event was handed out and not yet answered."""
        return self._pending is not None

    @property
    def in_transaction(self) -> bool:
        return self.mail is not None

    @property
    def advertised(self) -> frozenset[str]:
        """ESMTP keywords in force (empty after HELO: no parameters allowed then). Asked for
        each MAIL and RCPT; it changes only with EHLO/HELO and TLS, so it is kept per state."""
        state = (self.extended, self.tls)
        if state != self._advertised_for:
            self._advertised = self._advertise()
            self._advertised_for = state
        return self._advertised

    def _advertise(self) -> frozenset[str]:
        if not self.extended:
            return frozenset()
        s = self.settings
        names = {"ENHANCEDSTATUSCODES"} if s.enhanced_status_codes else set()
        for flag, name in (
            (s.pipelining, "PIPELINING"),
            (s.chunking, "CHUNKING"),
            (s.dsn, "DSN"),
            (s.smtputf8, "SMTPUTF8"),
            (s.eightbitmime, "8BITMIME"),
            (s.etrn, "ETRN"),
            (True, "SIZE"),
        ):
            if flag:
                names.add(name)
        if s.starttls and not self.tls:
            names.add("STARTTLS")
        if self._auth_offered:
            names.add("AUTH")
        return frozenset(names)

    @property
    def _auth_offered(self) -> bool:
        s = self.settings
        return bool(s.auth_mechanisms) and (self.tls or not s.auth_requires_tls)

    # ------------------------------------------------------------------ events

    def next_event(self) -> ev.Event | Wait:
        """The next event, NEED_DATA (feed more bytes) or PAUSED (answer the last decision)."""
        while True:
            if self._events:
                event = self._events.popleft()
                if isinstance(
                    event,
                    ev.Hello
                    | ev.MailFrom
                    | ev.RcptTo
                    | ev.BodyEnd
                    | ev.Verify
                    | ev.Expand
                    | ev.Etrn
                    | ev.AuthStart
                    | ev.AuthResponse,
                ):
                    self._pending = event
                return event
            if self._pending is not None:
                return PAUSED
            if not self._step():
                return NEED_DATA

    # ------------------------------------------------------------------ answers

    def greet(self, reply: Reply | None = None) -> None:
        """Send the 220 greeting (or a 421/554 refusal: then the session closes)."""
        if self.phase is not Phase.GREETING:
            raise ProtocolUsageError("greet() called twice")
        if reply is not None and reply.code != 220:
            self._send(reply)
            self._close("refused at greeting")
            return
        if self._early_input and self.settings.forbid_unauth_pipelining:
            self._send(SYNC_ERROR)
            self._close("pregreet: client talked before the greeting")
            return
        self._send(reply or Reply(220, f"{self.settings.hostname} {self.settings.banner}"))
        self.phase = Phase.COMMAND

    def accept(self) -> None:
        """Answer the outstanding decision with the standard positive reply."""
        event = self._take_pending()
        match event:
            case ev.Hello():
                self._hello_accepted(event)
            case ev.MailFrom():
                self.mail = event
                self._send(SENDER_OK)
            case ev.RcptTo():
                self.recipients.append(event)
                self._send(RECIPIENT_OK)
            case _:
                raise ProtocolUsageError(f"accept() has no default for {type(event).__name__}")

    def respond(self, reply: Reply) -> None:
        """Answer the outstanding decision with `reply` (a refusal, or a full answer)."""
        event = self._take_pending()
        if isinstance(event, ev.AuthStart | ev.AuthResponse):
            raise ProtocolUsageError("use auth_challenge()/auth_finish() during AUTH")
        if reply.is_success:
            match event:
                case ev.Hello():
                    self._hello_accepted(event, reply)
                    return
                case ev.MailFrom():
                    self.mail = event
                case ev.RcptTo():
                    self.recipients.append(event)
                case _:
                    pass
        self._send(reply)
        if isinstance(event, ev.BodyEnd):
            self._end_transaction()

    def auth_challenge(self, text: str) -> None:
        """Send `334 text` and read the client's next line as an AuthResponse."""
        event = self._take_pending()
        if not isinstance(event, ev.AuthStart | ev.AuthResponse):
            raise ProtocolUsageError("auth_challenge() outside AUTH")
        self._out += f"334 {text}\r\n".encode("ascii")
        self.phase = Phase.AUTH

    def auth_finish(self, reply: Reply, user: str | None) -> None:
        """End the AUTH exchange: `user` is the authenticated identity on success."""
        event = self._take_pending()
        if not isinstance(event, ev.AuthStart | ev.AuthResponse):
            raise ProtocolUsageError("auth_finish() outside AUTH")
        if user is not None and reply.is_success:
            self.authenticated = user
        self.phase = Phase.COMMAND
        self._send(reply)

    def tls_established(self) -> None:
        """The adapter finished the TLS handshake: start over as RFC 3207 §4.2 requires."""
        if self.phase is not Phase.STARTTLS:
            raise ProtocolUsageError("tls_established() without STARTTLS")
        self.tls = True
        self.helo = None
        self.extended = False
        self._in.clear()
        self.phase = Phase.COMMAND

    def close_with(self, reply: Reply, reason: str = "closed by server") -> None:
        """Send a final reply (421 on timeout or shutdown) and end the session."""
        if self.phase is Phase.CLOSED:
            return
        self._pending = None
        self._send(reply, count=False)
        self._close(reason)

    # ------------------------------------------------------------------ internals

    def _take_pending(self) -> ev.Event:
        if self._pending is None:
            raise ProtocolUsageError("no decision is outstanding")
        event, self._pending = self._pending, None
        return event

    def _send(self, reply: Reply, *, count: bool = True) -> None:
        self._out += reply.to_bytes(self.settings.enhanced_status_codes)
        if self._pending_cmd:
            stat = self.stats.setdefault(self._pending_cmd, [0, 0])
            stat[1] += 1
            if reply.code < 400:
                stat[0] += 1
            self._pending_cmd = ""
        if count and reply.code >= 400 and self.phase is not Phase.CLOSED:
            self.error_count += 1
            if self.error_count >= self.settings.hard_error_limit:
                self._out += _r(
                    421, "4.7.0", f"{self.settings.hostname} Error: too many errors"
                ).to_bytes(self.settings.enhanced_status_codes)
                self._close("too many errors")

    def _close(self, reason: str) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        self._in.clear()
        self._events.append(ev.Closed(reason))

    def _end_transaction(self) -> None:
        self.mail = None
        self.recipients = []
        self._overshoot = 0
        self._decoder = None
        self._body_size = 0
        self._body_error = None
        self._bdat_active = False
        self._bdat_cr = False

    def _reset(self) -> None:
        if self.mail is not None or self._bdat_active:
            self._events.append(ev.Reset())
        self._end_transaction()

    def _step(self) -> bool:
        """Make progress on buffered input; False when more bytes are needed."""
        match self.phase:
            case Phase.COMMAND:
                return self._step_command()
            case Phase.DATA:
                return self._step_data()
            case Phase.BDAT:
                return self._step_bdat()
            case Phase.AUTH:
                line = self._read_line(MAX_AUTH_LINE)
                if line is None:
                    return False
                if len(line) > MAX_AUTH_LINE:
                    self.phase = Phase.COMMAND
                    self._send(_r(500, "5.5.6", "Error: authentication line too long"))
                    return True
                self._events.append(ev.AuthResponse(line.decode("ascii", "replace")))
                return True
            case Phase.GREETING | Phase.STARTTLS | Phase.CLOSED:
                return False

    def _read_line(self, limit: int) -> bytes | None:
        """One line without its LF (and CR); None if incomplete. An overlong line is not kept:
        only its start is, and that start comes back as the line once the LF arrives. It is
        longer than any limit, so callers refuse it exactly as if it had arrived whole (one
        reply, same counters), however the bytes were split."""
        nl = self._in.find(b"\n")
        if self._discarding_line:
            if nl < 0:
                self._in.clear()
                return None
            del self._in[: nl + 1]
            self._discarding_line = False
            start, self._discarded = self._discarded, b""
            return start
        if nl < 0:
            cap = limit + MAIL_LINE_EXTRA + 2
            if len(self._in) > cap:
                self._discarding_line = True
                self._discarded = bytes(self._in[: cap + 1])
                self._in.clear()
            return None
        line = bytes(self._in[:nl])
        del self._in[: nl + 1]
        return line[:-1] if line.endswith(b"\r") else line

    def _step_command(self) -> bool:
        raw = self._read_line(max(self.settings.command_line_limit, MAX_AUTH_LINE))
        if raw is None:
            return False
        self._command(raw)
        return True

    def _command(self, raw: bytes) -> None:
        self.command_count += 1
        if self.settings.max_commands and self.command_count > self.settings.max_commands:
            self._send(
                _r(421, "4.7.0", f"{self.settings.hostname} Error: too many commands"), count=False
            )
            return self._close("too many commands")
        text = raw.decode("utf-8", "surrogateescape")
        verb, _, arg = text.partition(" ")
        verb = verb.upper() if verb.isascii() else verb
        self._pending_cmd = verb.lower() if verb in HELP_TEXT or verb in OBSOLETE else "unknown"
        limit = self.settings.command_line_limit - 2
        if verb == "MAIL":
            limit += MAIL_LINE_EXTRA
        elif verb == "RCPT":
            limit += RCPT_LINE_EXTRA
        elif verb == "AUTH":
            limit = MAX_AUTH_LINE
        if len(raw) > limit:
            return self._send(_r(500, "5.5.2", "Error: line too long"))
        if b"\x00" in raw:
            return self._send(_r(500, "5.5.2", "Error: NUL character in command"))
        if b"\r" in raw:
            return self._send(_r(500, "5.5.2", "Error: bare <CR> in command"))
        if not raw.isascii():
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return self._send(_r(500, "5.5.2", "Error: invalid UTF-8 in command"))
            if verb not in ("MAIL", "RCPT", "VRFY", "EXPN"):
                return self._send(_r(500, "5.5.2", "Error: 8-bit characters in command"))
        if (
            verb in _GROUP_ENDERS
            and self._in
            and self.settings.forbid_unauth_pipelining
            and self.authenticated is None
            and verb != "STARTTLS"
        ):
            self._send(SYNC_ERROR, count=False)
            return self._close(f"improper command pipelining after {verb}")
        arg = arg.strip(" ")
        self._dispatch(verb, arg)

    def _dispatch(self, verb: str, arg: str) -> None:
        match verb:
            case "HELO" | "EHLO":
                if not arg or " " in arg.strip():
                    return self._send(_r(501, "5.5.4", f"Syntax: {verb} hostname"))
                self._reset()
                self._events.append(ev.Hello(arg, verb == "EHLO"))
            case "MAIL":
                self._mail(arg)
            case "RCPT":
                self._rcpt(arg)
            case "DATA":
                self._data(arg)
            case "BDAT":
                self._bdat(arg)
            case "RSET":
                if arg:
                    return self._send(_r(501, "5.5.4", "Syntax: RSET"))
                self._reset()
                self._send(OK)
            case "NOOP":
                self._send(OK)
            case "QUIT":
                self._send(_r(221, "2.0.0", "Bye"))
                self._close("quit")
            case "HELP":
                self._help(arg)
            case "VRFY" | "EXPN":
                if not arg:
                    return self._send(_r(501, "5.5.4", f"Syntax: {verb} address"))
                self._events.append(ev.Verify(arg) if verb == "VRFY" else ev.Expand(arg))
            case "ETRN":
                self._etrn(arg)
            case "STARTTLS":
                self._starttls(arg)
            case "AUTH":
                self._auth(arg)
            case _ if verb in OBSOLETE:
                self._send(_r(502, "5.5.1", "Error: command not implemented"))
            case _:
                self._send(_r(500, "5.5.2", "Error: command not recognized"))

    def _hello_accepted(self, event: ev.Hello, reply: Reply | None = None) -> None:
        self.helo = event.name
        self.extended = event.extended
        first = reply.text if reply else self.settings.hostname
        if not event.extended:
            self._send(Reply(250, first))
            return
        s = self.settings
        lines = []
        if s.pipelining:
            lines.append("PIPELINING")
        lines.append(f"SIZE {s.max_message_size}")
        if s.etrn:
            lines.append("ETRN")
        if s.starttls and not self.tls:
            lines.append("STARTTLS")
        if self._auth_offered:
            lines.append("AUTH " + " ".join(s.auth_mechanisms))
        if s.enhanced_status_codes:
            lines.append("ENHANCEDSTATUSCODES")
        if s.eightbitmime:
            lines.append("8BITMIME")
        if s.dsn:
            lines.append("DSN")
        if s.smtputf8:
            lines.append("SMTPUTF8")
        if s.chunking:
            lines.append("CHUNKING")
        self._send(Reply(250, first, None, tuple(lines)))

    def _mail(self, arg: str) -> None:
        if self.helo is None:
            return self._send(BAD_SEQUENCE_HELO)
        if self.mail is not None:
            return self._send(_r(503, "5.5.1", "Error: nested MAIL command"))
        if arg[:5].upper() != "FROM:":
            return self._send(_r(501, "5.5.4", "Syntax: MAIL FROM:<address>"))
        try:
            address, params_text = parse_path(arg[5:], null_ok=True, utf8=True)
            params = parse_mail_params(params_text, extensions=self.advertised)
            if not address.isascii() and not params.smtputf8:
                return self._send(
                    _r(553, "5.6.7", "Error: must declare SMTPUTF8 to send non-ASCII addresses")
                )
        except AddressError as err:
            return self._send(err.reply)
        if params.size is not None and params.size > self.settings.max_message_size:
            return self._send(
                _r(552, "5.3.4", "Error: message size exceeds fixed maximum message size")
            )
        self._events.append(ev.MailFrom(address, params))

    def _rcpt(self, arg: str) -> None:
        if self.mail is None:
            return self._send(_r(503, "5.5.1", "Error: need MAIL command"))
        if self._bdat_active:
            return self._send(_r(503, "5.5.1", "Error: BDAT transfer in progress"))
        if arg[:3].upper() != "TO:":
            return self._send(_r(501, "5.5.4", "Syntax: RCPT TO:<address>"))
        utf8 = self.mail.params.smtputf8
        try:
            address, params_text = parse_path(
                arg[3:], null_ok=False, utf8=True, bare_postmaster_ok=True
            )
            if not address.isascii() and not utf8:
                return self._send(
                    _r(553, "5.6.7", "Error: must declare SMTPUTF8 to send non-ASCII addresses")
                )
            params = parse_rcpt_params(params_text, extensions=self.advertised)
        except AddressError as err:
            return self._send(err.reply)
        if len(self.recipients) >= max(self.settings.max_recipients, MIN_RECIPIENTS):
            # 452 asks the client to send the rest in another transaction (RFC 5321
            # §4.5.3.1.10); it is not the client's error until it overshoots by far.
            self._overshoot += 1
            return self._send(
                _r(452, "4.5.3", "Error: too many recipients"),
                count=self._overshoot > RECIPIENT_OVERSHOOT,
            )
        self._events.append(ev.RcptTo(address, params))

    def _data(self, arg: str) -> None:
        if arg:
            return self._send(_r(501, "5.5.4", "Syntax: DATA"))
        if self._bdat_active:
            return self._send(_r(503, "5.5.1", "Error: BDAT transfer in progress"))
        if self.mail is None:
            return self._send(_r(503, "5.5.1", "Error: need MAIL command"))
        if not self.recipients:
            return self._send(_r(503, "5.5.1", "Error: need RCPT command"))
        if self.data_gate is not None and (refusal := self.data_gate()) is not None:
            return self._send(refusal)
        self._pending_cmd = ""  # DATA is counted once, by its final reply
        self._send(Reply(354, "End data with <CR><LF>.<CR><LF>"))
        self.phase = Phase.DATA
        self._decoder = DotDecoder()
        self._body_size = 0
        self._body_error = None

    def _add_body(self, data: bytes) -> None:
        if not data or self._body_error is not None:
            return
        self._body_size += len(data)
        if self._body_size > self.settings.max_message_size:
            self._body_error = _r(552, "5.3.4", "Error: message file too big")
        else:
            self._events.append(ev.BodyData(data))

    def _finish_body(self, bad_newline: bool) -> None:
        self.phase = Phase.COMMAND
        if bad_newline and self._body_error is None:
            self._body_error = _r(
                554, "5.5.2", "Error: bare <CR> or <LF> in message data (RFC 5321 2.3.8)"
            )
        if self._body_error is not None:
            reply = self._body_error
            self._events.append(ev.BodyAborted(reply))
            self._pending_cmd = "data" if self._decoder else "bdat"
            self._send(reply)
            self._end_transaction()
            return
        self._pending_cmd = "data" if self._decoder else "bdat"
        self._events.append(ev.BodyEnd(self._body_size))

    def _step_data(self) -> bool:
        if not self._in:
            return False
        assert self._decoder is not None
        piece = self._decoder.feed(bytes(self._in))
        self._in.clear()
        self._add_body(piece.data)
        if piece.done:
            self._in += piece.rest
            self._finish_body(self._decoder.bad_newline)
        return True

    def _bdat(self, arg: str) -> None:
        parts = arg.split(" ")
        last = len(parts) == 2 and parts[1].upper() == "LAST"
        if not parts[0].isdigit() or len(parts[0]) > 18 or not (len(parts) == 1 or last):
            self._send(_r(501, "5.5.4", "Syntax: BDAT size [LAST]"), count=False)
            return self._close("unparsable BDAT: cannot resynchronise")
        size = int(parts[0])
        refusal: Reply | None = None
        if not self.settings.chunking or not self.extended:
            refusal = _r(503, "5.5.1", "Error: CHUNKING not offered, send EHLO first")
        elif self.mail is None:
            refusal = _r(503, "5.5.1", "Error: need MAIL command")
        elif not self.recipients:
            refusal = _r(503, "5.5.1", "Error: need RCPT command")
        elif not self._bdat_active and self.data_gate is not None:
            refusal = self.data_gate()
        self._bdat_remaining = size
        self._bdat_last = last
        self._bdat_refusal = refusal
        if refusal is None:
            self._bdat_active = True
        self.phase = Phase.BDAT
        self._step_bdat()

    def _step_bdat(self) -> bool:
        if self._bdat_remaining:
            if not self._in:
                return False
            take = bytes(self._in[: self._bdat_remaining])
            del self._in[: len(take)]
            self._bdat_remaining -= len(take)
            if self._bdat_refusal is None:
                bad, self._bdat_cr = has_bare_newline(take, after_cr=self._bdat_cr)
                if bad and self._body_error is None:
                    self._body_error = _r(
                        554, "5.5.2", "Error: bare <CR> or <LF> in message data (RFC 5321 2.3.8)"
                    )
                self._add_body(take)
            if self._bdat_remaining:
                return True
        self.phase = Phase.COMMAND
        if self._bdat_refusal is not None:
            self._send(self._bdat_refusal)
        elif self._bdat_last:
            self._finish_body(self._bdat_cr)
        elif self._body_error is not None:
            self._send(self._body_error)
        else:
            self._send(_r(250, "2.0.0", f"Ok: {self._body_size} octets received"))
        return True

    def _help(self, arg: str) -> None:
        if not arg:
            names = " ".join(verb for verb in ORDER if self._unavailable(verb) is None)
            self._send(
                Reply(214, "Commands:", "2.0.0", (names, "HELP <command> explains one command"))
            )
            return
        verb = arg.upper()
        text = HELP_TEXT.get(verb)
        if text is None:
            return self._send(_r(504, "5.5.1", f"Error: unknown command {arg[:30]!r}"))
        why = self._unavailable(verb)
        if why is not None:
            text = f"{text}; not available here: {why}"
        self._send(_r(214, "2.0.0", text))

    def _unavailable(self, verb: str) -> str | None:
        """Why `verb` answers 502 on this listener whatever the client does (None: it works);
        HELP lists only what works here."""
        s = self.settings
        match verb:
            case "STARTTLS" if self.tls:
                return "TLS is already active"
            case "STARTTLS" if not s.starttls:
                return "no certificate configured"
            case "AUTH" if not s.auth_mechanisms:
                return "authentication is offered on the submission ports only"
            case "ETRN" if not s.etrn:
                return "no mail is held for part-time hosts"
            case "BDAT" if not s.chunking:
                return "CHUNKING is turned off"
        return None

    def _etrn(self, arg: str) -> None:
        if not self.settings.etrn:
            return self._send(_r(502, "5.5.1", "Error: command not implemented"))
        if self.helo is None:
            return self._send(BAD_SEQUENCE_HELO)
        if self.mail is not None:
            return self._send(_r(503, "5.5.1", "Error: MAIL transaction in progress"))
        if not arg or " " in arg:
            return self._send(_r(500, "5.5.2", "Syntax: ETRN domain"))
        self._events.append(ev.Etrn(arg))

    def _starttls(self, arg: str) -> None:
        if not self.settings.starttls:
            return self._send(_r(502, "5.5.1", "Error: command not implemented"))
        if self.tls:
            return self._send(_r(554, "5.5.1", "Error: TLS already active"))
        if arg:
            return self._send(_r(501, "5.5.4", "Syntax: STARTTLS"))
        if self.mail is not None:
            return self._send(_r(503, "5.5.1", "Error: MAIL transaction in progress"))
        self._send(_r(220, "2.0.0", "Ready to start TLS"))
        self._in.clear()  # plaintext pipelined after STARTTLS is never interpreted
        self.phase = Phase.STARTTLS
        self._events.append(ev.StartTLS())

    def _auth(self, arg: str) -> None:
        s = self.settings
        if not s.auth_mechanisms:
            return self._send(_r(502, "5.5.1", "Error: authentication not enabled"))
        if not self._auth_offered:
            return self._send(
                _r(538, "5.7.11", "Error: encryption required for requested authentication")
            )
        if not self.extended:
            return self._send(_r(503, "5.5.1", "Error: send EHLO first"))
        if self.authenticated is not None:
            return self._send(_r(503, "5.5.1", "Error: already authenticated"))
        if self.mail is not None:
            return self._send(_r(503, "5.5.1", "Error: MAIL transaction in progress"))
        mech, _, initial = arg.partition(" ")
        if not mech or " " in initial:
            return self._send(_r(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"))
        if mech.upper() not in s.auth_mechanisms:
            return self._send(_r(504, "5.5.4", "Error: unsupported authentication mechanism"))
        self._events.append(ev.AuthStart(mech.upper(), initial or None))


def transaction_params(conn: ServerConnection) -> MailParams:
    """The MAIL parameters of the current transaction (for building the envelope)."""
    if conn.mail is None:
        raise ProtocolUsageError("no transaction")
    return conn.mail.params
