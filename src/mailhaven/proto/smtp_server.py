"""The SMTP server protocol core, sans-I/O (RFC 5321 with PIPELINING, CHUNKING, DSN, SMTPUTF8;
LMTP, RFC 2033, with `ServerSettings.lmtp`).

Bytes in (`receive_data`), events out (`next_event`), replies out (`data_to_send`). No sockets,
clocks or files: the asyncio adapter in `mailhaven.smtpd` moves bytes and answers decisions.

The core decides what is *legal*: syntax, command order, limits, PIPELINING rules, body framing.
The application decides what is *welcome*: it answers each decision event with `accept()` (the
standard positive reply) or `respond(reply)`. While a decision is outstanding the core reads no
further input, so pipelined commands are answered strictly in order (RFC 2920 §3.2). The command
sequence is data: `State` and the (state, verb) table in `proto.smtp_states`, consulted for every
command; every state change is checked against `TRANSITIONS`. Reply texts are in
`proto.replies`; the listener's offer (EHLO keywords, line limits, HELP) in `proto.smtp_commands`.
The core keeps no statistics: it says which command each reply answered (`Answered`).

LMTP mode: LHLO replaces HELO/EHLO (which get 500); after the end of a message the application
gets `LmtpBodyEnd` with the accepted recipients and calls `respond()` once for each, in order.

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

from collections import deque
from collections.abc import Callable

from mailhaven.proto import replies as r
from mailhaven.proto import smtp_server_events as ev
from mailhaven.proto.address import MailParams
from mailhaven.proto.body import MessageBody
from mailhaven.proto.lines import LineReader
from mailhaven.proto.replies import Reply
from mailhaven.proto.sansio import NEED_DATA as NEED_DATA
from mailhaven.proto.sansio import PAUSED as PAUSED
from mailhaven.proto.sansio import UsageError, Wait
from mailhaven.proto.smtp_commands import (
    MAIL_LINE_EXTRA,
    MAX_AUTH_LINE,
    ServerSettings,
    capabilities,
    check_line,
    help_reply,
    keywords,
    parse_auth,
    parse_bdat,
    parse_etrn,
    parse_hello,
    parse_lookup,
    parse_mail,
    parse_rcpt,
    refuse_unavailable,
)
from mailhaven.proto.smtp_help import OBSOLETE
from mailhaven.proto.smtp_states import (
    LMTP_COMMANDS,
    SMTP_COMMANDS,
    TRANSITIONS,
    State,
)

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "ServerConnection",
    "ServerSettings",
    "State",
    "UsageError",
    "Wait",
    "transaction_params",
]

#: RFC 5321 §4.5.3.1.8: at least 100 recipients must be accepted (Postfix: 1000).
MIN_RECIPIENTS = 100
#: Postfix's smtpd_recipient_overshoot_limit: recipients past the limit answered 452 before
#: each further one counts as an error (a client legitimately pipelines a big batch).
RECIPIENT_OVERSHOOT = 1000
#: Commands after which a client must wait for the reply (RFC 2920 §3.1, RFC 3207, RFC 4954).
_GROUP_ENDERS = frozenset(
    {"EHLO", "HELO", "LHLO", "DATA", "VRFY", "EXPN", "NOOP", "HELP", "ETRN", "AUTH"}
)

#: The event types that wait for an answer (`ev.Decision`), for a cheap test per event.
_DECISIONS = frozenset(ev.Decision.__args__)
#: Verbs that some listeners cannot run at all (`refuse_unavailable`).
_LISTENER_VERBS = frozenset({"STARTTLS", "ETRN", "AUTH"})


def _stat_names(lmtp: bool) -> dict[str, str]:
    """Verb -> its name in the statistics (`Answered`); absent verbs count as "unknown"."""
    verdicts = (LMTP_COMMANDS if lmtp else SMTP_COMMANDS)[State.READY]
    known = [v for v, verdict in verdicts.items() if verdict is not r.UNRECOGNIZED]
    return {verb: verb.lower() for verb in (*known, *OBSOLETE)}


_SMTP_STAT_NAMES = _stat_names(lmtp=False)
_LMTP_STAT_NAMES = _stat_names(lmtp=True)


class ServerConnection:
    """One SMTP session's protocol state. Not thread-safe; one per connection."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.state = State.GREETING
        self.tls = settings.tls_on_connect
        self.helo: str | None = None
        self.extended = False
        self.authenticated: str | None = None
        self.mail: ev.MailFrom | None = None
        self.recipients: list[ev.RcptTo] = []
        self.error_count = 0
        self.command_count = 0
        #: Asked when a body is about to start (DATA, first BDAT chunk): a refusal such as
        #: `452 4.3.1` (spool full) is sent instead of 354 / instead of taking the chunk.
        self.data_gate: Callable[[], Reply | None] | None = None
        self._commands = LMTP_COMMANDS if settings.lmtp else SMTP_COMMANDS
        self._stat_names = _LMTP_STAT_NAMES if settings.lmtp else _SMTP_STAT_NAMES
        self._in = bytearray()
        self._out = bytearray()
        self._events: deque[ev.Event] = deque()
        self._pending: ev.Event | None = None
        #: The verb whose reply is due, for `Answered` ("" once counted).
        self._verb = ""
        #: LMTP: recipient replies still due for the message (`LmtpBodyEnd`).
        self._replies_due = 0
        self._lines = LineReader()
        self._early_input = False
        self._body: MessageBody | None = None
        self._bdat_remaining = 0
        self._bdat_last = False
        self._bdat_refusal: Reply | None = None
        #: Where a refused BDAT chunk returns once it has been read.
        self._bdat_return = State.READY
        self._overshoot = 0
        self._keywords: frozenset[str] = frozenset()
        self._keywords_for: tuple[bool, bool] | None = None

    # ------------------------------------------------------------------ bytes in / out

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the client; `b""` means the client closed its side."""
        if self.state is State.CLOSED:
            return
        if not data:
            self._close("lost connection")
            return
        if self.state is State.GREETING:
            self._early_input = True
        if self.state is State.STARTTLS:
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
        return self.state is State.CLOSED

    @property
    def in_body(self) -> bool:
        """Message content is being read (DATA, or a BDAT chunk)."""
        return self.state is State.DATA or self.state is State.BDAT

    @property
    def awaiting_decision(self) -> bool:
        """A decision event was handed out and not yet answered."""
        return self._pending is not None

    @property
    def in_transaction(self) -> bool:
        return self.mail is not None

    @property
    def replies_due(self) -> int:
        """LMTP: how many recipient replies the outstanding `LmtpBodyEnd` still needs."""
        return self._replies_due

    @property
    def advertised(self) -> frozenset[str]:
        """ESMTP keywords in force (empty after HELO: no parameters allowed then). Asked for
        each MAIL and RCPT; it changes only with EHLO/HELO and TLS, so it is kept per state."""
        key = (self.extended, self.tls)
        if key != self._keywords_for:
            self._keywords = keywords(self.settings, self.tls) if self.extended else frozenset()
            self._keywords_for = key
        return self._keywords

    # ------------------------------------------------------------------ events

    def next_event(self) -> ev.Event | Wait:
        """The next event, NEED_DATA (feed more bytes) or PAUSED (answer the last decision)."""
        while True:
            if self._events:
                event = self._events.popleft()
                if type(event) in _DECISIONS:
                    self._pending = event
                return event
            if self._pending is not None:
                return PAUSED
            if not self._step():
                return NEED_DATA

    # ------------------------------------------------------------------ answers

    def greet(self, reply: Reply | None = None) -> None:
        """Send the 220 greeting (or a 421/554 refusal: then the session closes)."""
        if self.state is not State.GREETING:
            raise UsageError("greet() called twice")
        if reply is not None and reply.code != 220:
            self._send(reply)
            self._close("refused at greeting")
            return
        if self._early_input and self.settings.forbid_unauth_pipelining:
            self._send(r.SYNC_ERROR)
            self._close("pregreet: client talked before the greeting")
            return
        self._send(reply or r.greeting(self.settings.hostname, self.settings.banner))
        self._set(State.CONNECTED)

    def accept(self) -> None:
        """Answer the outstanding decision with the standard positive reply."""
        event = self._take_pending()
        match event:
            case ev.Hello():
                self._hello_accepted(event)
            case ev.MailFrom():
                self._mail_accepted(event)
                self._send(r.SENDER_OK)
            case ev.RcptTo():
                self._rcpt_accepted(event)
                self._send(r.RECIPIENT_OK)
            case _:
                self._pending = event
                raise UsageError(f"accept() has no default for {type(event).__name__}")

    def respond(self, reply: Reply) -> None:
        """Answer the outstanding decision with `reply` (a refusal, or a full answer). For
        `LmtpBodyEnd`, call it once per recipient: the decision stays open until the last."""
        event = self._take_pending()
        match event:
            case ev.AuthStart() | ev.AuthResponse():
                self._pending = event
                raise UsageError("use auth_challenge()/auth_finish() during AUTH")
            case ev.Hello() if reply.is_success:
                return self._hello_accepted(event, reply)
            case ev.MailFrom() if reply.is_success:
                self._mail_accepted(event)
            case ev.RcptTo() if reply.is_success:
                self._rcpt_accepted(event)
            case ev.LmtpBodyEnd():
                return self._recipient_reply(event, reply)
        self._send(reply)
        if isinstance(event, ev.BodyEnd):
            self._end_transaction()

    def auth_challenge(self, text: str) -> None:
        """Send `334 text` and read the client's next line as an AuthResponse."""
        event = self._take_pending()
        if not isinstance(event, ev.AuthStart | ev.AuthResponse):
            self._pending = event
            raise UsageError("auth_challenge() outside AUTH")
        self._out += f"334 {text}\r\n".encode("ascii")
        self._set(State.AUTH)

    def auth_finish(self, reply: Reply, user: str | None) -> None:
        """End the AUTH exchange: `user` is the authenticated identity on success."""
        event = self._take_pending()
        if not isinstance(event, ev.AuthStart | ev.AuthResponse):
            self._pending = event
            raise UsageError("auth_finish() outside AUTH")
        if user is not None and reply.is_success:
            self.authenticated = user
        self._set(State.READY)
        self._send(reply)

    def tls_established(self) -> None:
        """The adapter finished the TLS handshake: start over as RFC 3207 §4.2 requires."""
        if self.state is not State.STARTTLS:
            raise UsageError("tls_established() without STARTTLS")
        self.tls = True
        self.helo = None
        self.extended = False
        self._in.clear()
        self._set(State.CONNECTED)

    def close_with(self, reply: Reply, reason: str = "closed by server") -> None:
        """Send a final reply (421 on timeout or shutdown) and end the session."""
        if self.state is State.CLOSED:
            return
        self._pending = None
        self._send(reply, count=False)
        self._close(reason)

    # ------------------------------------------------------------------ internals

    def _set(self, state: State) -> None:
        """Change state; the transition table is checked on every change. A closed session
        stays closed: an answer that comes after the client left changes nothing."""
        if self.state is State.CLOSED:
            return
        if state is not self.state and state not in TRANSITIONS[self.state]:
            raise AssertionError(f"illegal transition {self.state.name} -> {state.name}")
        self.state = state

    def _take_pending(self) -> ev.Event:
        if self._pending is None:
            raise UsageError("no decision is outstanding")
        event, self._pending = self._pending, None
        return event

    def _send(self, reply: Reply, *, count: bool = True) -> None:
        self._out += reply.to_bytes(self.settings.enhanced_status_codes)
        if self._verb:
            self._events.append(ev.Answered(self._verb, reply))
            self._verb = ""
        if count and reply.code >= 400 and self.state is not State.CLOSED:
            self.error_count += 1
            if self.error_count >= self.settings.hard_error_limit:
                self._out += r.too_many_errors(self.settings.hostname).to_bytes(
                    self.settings.enhanced_status_codes
                )
                self._close("too many errors")

    def _close(self, reason: str) -> None:
        if self.state is State.CLOSED:
            return
        self._set(State.CLOSED)
        self._in.clear()
        self._events.append(ev.Closed(reason))

    def _after_hello(self) -> State:
        """The command state without a transaction: READY once HELO/EHLO was accepted."""
        return State.CONNECTED if self.helo is None else State.READY

    def _hello_accepted(self, event: ev.Hello, reply: Reply | None = None) -> None:
        self.helo = event.name
        self.extended = event.extended
        self._set(State.READY)
        first = reply.text if reply else self.settings.hostname
        if not event.extended:
            self._send(r.hello(first))
        else:
            self._send(r.hello(first, capabilities(self.settings, self.tls)))

    def _mail_accepted(self, event: ev.MailFrom) -> None:
        self.mail = event
        self._set(State.MAIL)

    def _rcpt_accepted(self, event: ev.RcptTo) -> None:
        self.recipients.append(event)
        self._set(State.RCPT)

    def _recipient_reply(self, event: ev.LmtpBodyEnd, reply: Reply) -> None:
        """One of LMTP's per-recipient replies (RFC 2033 §4.2): the statistics count the last,
        and none counts as the client's error (they are our verdicts on our mailboxes)."""
        self._replies_due -= 1
        if self._replies_due > 0:
            self._pending = event
            verb, self._verb = self._verb, ""
            self._send(reply, count=False)
            self._verb = verb
            return
        self._send(reply, count=False)
        self._end_transaction()

    def _end_transaction(self) -> None:
        self.mail = None
        self.recipients = []
        self._overshoot = 0
        self._body = None
        self._replies_due = 0
        if self.state is not State.CLOSED:
            self._set(self._after_hello())

    def _reset(self) -> None:
        if self.mail is not None:
            self._events.append(ev.Reset())
        self._end_transaction()

    def _step(self) -> bool:
        """Make progress on buffered input; False when more bytes are needed."""
        match self.state:
            case State.CONNECTED | State.READY | State.MAIL | State.RCPT | State.CHUNKING:
                return self._step_command()
            case State.DATA:
                return self._step_data()
            case State.BDAT:
                return self._step_bdat()
            case State.AUTH:
                return self._step_auth()
            case State.GREETING | State.STARTTLS | State.BODY_END | State.CLOSED:
                return False

    def _step_auth(self) -> bool:
        line = self._read_line(MAX_AUTH_LINE)
        if line is None:
            return False
        if len(line) > MAX_AUTH_LINE:
            self._set(State.READY)
            self._send(r.AUTH_LINE_TOO_LONG)
            return True
        self._events.append(ev.AuthResponse(line.decode("ascii", "replace")))
        return True

    def _read_line(self, limit: int) -> bytes | None:
        return self._lines.read(self._in, limit + MAIL_LINE_EXTRA + 2)

    def _step_command(self) -> bool:
        raw = self._read_line(max(self.settings.command_line_limit, MAX_AUTH_LINE))
        if raw is None:
            return False
        self._command(raw)
        return True

    def _command(self, raw: bytes) -> None:
        s = self.settings
        self.command_count += 1
        if s.max_commands and self.command_count > s.max_commands:
            self._send(r.too_many_commands(s.hostname), count=False)
            return self._close("too many commands")
        text = raw.decode("utf-8", "surrogateescape")
        verb, _, arg = text.partition(" ")
        verb = verb.upper() if verb.isascii() else verb
        verdicts = self._commands[self.state]
        self._verb = self._stat_names.get(verb, "unknown")
        refusal = check_line(s, verb, raw)
        if refusal is not None:
            return self._send(refusal)
        if (
            verb in _GROUP_ENDERS
            and self._in
            and s.forbid_unauth_pipelining
            and self.authenticated is None
        ):
            self._send(r.SYNC_ERROR, count=False)
            return self._close(f"improper command pipelining after {verb}")
        arg = arg.strip(" ")
        if verb not in verdicts:
            return self._send(r.NOT_IMPLEMENTED if verb in OBSOLETE else r.UNRECOGNIZED)
        if verb in _LISTENER_VERBS and (refusal := refuse_unavailable(s, verb, self.tls)):
            return self._send(refusal)
        verdict = verdicts[verb]
        if verb == "BDAT":  # refused or not, the chunk is read (RFC 3030 §2)
            return self._bdat(arg, verdict)
        if verdict is not None:
            return self._send(verdict)
        self._run(verb, arg)

    # ------------------------------------------------------------------ commands
    # Each runs only where the table in `proto.smtp_states` says RUN: no sequence checks here.

    def _run(self, verb: str, arg: str) -> None:
        match verb:
            case "HELO" | "EHLO" | "LHLO":
                self._hello(verb, arg)
            case "MAIL":
                self._emit_or_send(parse_mail(arg, self.advertised, self.settings))
            case "RCPT":
                self._rcpt(arg)
            case "DATA":
                self._data(arg)
            case "RSET":
                self._rset(arg)
            case "NOOP":
                self._send(r.OK)
            case "QUIT":
                self._send(r.BYE)
                self._close("quit")
            case "HELP":
                self._send(help_reply(self.settings, arg, self.tls))
            case "VRFY" | "EXPN":
                self._emit_or_send(parse_lookup(verb, arg))
            case "ETRN":
                self._emit_or_send(parse_etrn(arg))
            case "STARTTLS":
                self._starttls(arg)
            case "AUTH":
                self._auth(arg)
            case _:
                raise AssertionError(f"no handler for {verb}")

    def _hello(self, verb: str, arg: str) -> None:
        hello = parse_hello(verb, arg)
        if isinstance(hello, Reply):
            return self._send(hello)
        self._reset()
        self._events.append(hello)

    def _rset(self, arg: str) -> None:
        if arg:
            return self._send(r.syntax("RSET"))
        self._reset()
        self._send(r.OK)

    def _rcpt(self, arg: str) -> None:
        assert self.mail is not None
        rcpt = parse_rcpt(arg, self.advertised, smtputf8=self.mail.params.smtputf8)
        if isinstance(rcpt, Reply):
            return self._send(rcpt)
        if len(self.recipients) >= max(self.settings.max_recipients, MIN_RECIPIENTS):
            # 452 asks the client to send the rest in another transaction (RFC 5321
            # §4.5.3.1.10); it is not the client's error until it overshoots by far.
            self._overshoot += 1
            return self._send(r.TOO_MANY_RECIPIENTS, count=self._overshoot > RECIPIENT_OVERSHOOT)
        self._events.append(rcpt)

    def _data(self, arg: str) -> None:
        if arg:
            return self._send(r.syntax("DATA"))
        if self.data_gate is not None and (refusal := self.data_gate()) is not None:
            return self._send(refusal)
        self._start_data()

    def _starttls(self, arg: str) -> None:
        if arg:
            return self._send(r.syntax("STARTTLS"))
        self._send(r.START_TLS)
        self._in.clear()  # plaintext pipelined after STARTTLS is never interpreted
        self._set(State.STARTTLS)
        self._events.append(ev.StartTLS())

    def _auth(self, arg: str) -> None:
        s = self.settings
        if not self.extended:
            return self._send(r.NEED_LHLO if s.lmtp else r.NEED_EHLO)
        if self.authenticated is not None:
            return self._send(r.ALREADY_AUTHENTICATED)
        self._emit_or_send(parse_auth(arg, s.auth_mechanisms))

    def _emit_or_send(self, outcome: ev.Event | Reply) -> None:
        """A parsed command becomes its event; a refusal is answered at once."""
        if isinstance(outcome, Reply):
            self._send(outcome)
        else:
            self._events.append(outcome)

    # ------------------------------------------------------------------ message bodies

    def _start_data(self) -> None:
        self._verb = ""  # DATA is counted once, by its final reply
        self._send(r.START_DATA)
        self._set(State.DATA)
        self._body = MessageBody(self.settings.max_message_size, chunked=False)

    def _step_data(self) -> bool:
        if not self._in:
            return False
        assert self._body is not None
        content, done = self._body.read_data(self._in)
        if content:
            self._events.append(ev.BodyData(content))
        if done:
            self._finish_body(self._body)
        return True

    def _finish_body(self, body: MessageBody) -> None:
        self._verb = "bdat" if body.chunked else "data"
        reply = body.end()
        if reply is not None:
            self._set(State.READY)
            self._events.append(ev.BodyAborted(reply))
            if self.settings.lmtp:  # a reply per recipient, one error (RFC 2033 §4.2)
                for _ in self.recipients[1:]:
                    self._out += reply.to_bytes(self.settings.enhanced_status_codes)
            self._send(reply)
            self._end_transaction()
        elif self.settings.lmtp:
            self._set(State.BODY_END)
            self._replies_due = len(self.recipients)
            self._events.append(ev.LmtpBodyEnd(body.size, tuple(self.recipients)))
        else:
            self._set(State.BODY_END)
            self._events.append(ev.BodyEnd(body.size))

    def _bdat(self, arg: str, refusal: Reply | None) -> None:
        parsed = parse_bdat(arg)
        if parsed is None:
            self._send(r.syntax("BDAT size [LAST]"), count=False)
            return self._close("unparsable BDAT: cannot resynchronise")
        if not self.settings.chunking or (self.helo is not None and not self.extended):
            refusal = r.CHUNKING_NOT_OFFERED  # (after HELO, whatever the table says)
        elif refusal is None and self.state is State.RCPT and self.data_gate is not None:
            refusal = self.data_gate()
        if refusal is None and self._body is None:
            self._body = MessageBody(self.settings.max_message_size, chunked=True)
        self._bdat_remaining, self._bdat_last = parsed
        self._bdat_refusal = refusal
        self._bdat_return = self.state
        self._set(State.BDAT)
        self._step_bdat()

    def _step_bdat(self) -> bool:
        if self._bdat_remaining:
            if not self._in:
                return False
            take = bytes(self._in[: self._bdat_remaining])
            del self._in[: len(take)]
            self._bdat_remaining -= len(take)
            if self._bdat_refusal is None and self._body is not None:
                content = self._body.add_chunk(take)
                if content:
                    self._events.append(ev.BodyData(content))
            if self._bdat_remaining:
                return True
        if self._bdat_refusal is not None or self._body is None:
            self._set(self._bdat_return)
            self._send(self._bdat_refusal or r.NEED_MAIL)
        elif self._bdat_last:
            self._finish_body(self._body)
        else:
            self._set(State.CHUNKING)
            self._send(self._body.error or r.chunk_received(self._body.size))
        return True


def transaction_params(conn: ServerConnection) -> MailParams:
    """The MAIL parameters of the current transaction (for building the envelope)."""
    if conn.mail is None:
        raise UsageError("no transaction")
    return conn.mail.params
