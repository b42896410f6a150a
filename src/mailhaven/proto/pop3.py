"""POP3 server core, sans-I/O: RFC 1939, CAPA (RFC 2449), STLS (RFC 2595), SASL PLAIN (RFC 5034).

Bytes go in with `receive_data` (`b""` means EOF), events come out of `next_event`, the application
answers each event (`accept_login`, `reject_login`, `ok`, `err`, `listing`, `message_*`), and the
bytes to write come out of `data_to_send`. The core owns everything that is *legal*: line framing
and limits, which command is valid in which state (the `COMMANDS` table), argument syntax,
PIPELINING order (one event at a time, the next only after the answer), the SASL exchange, CAPA,
STLS, dot-stuffing and CRLF conversion of message bodies. The application owns what is *welcome*:
whether a password is right, what the maildrop holds, whether a message number exists.

Invariants: exactly one event awaits an answer at any time, and `next_event` refuses to run until
it is answered, so replies leave in command order. Once `state` is CLOSED nothing more is parsed.
After STLS the core drops every byte buffered before the handshake (CVE-2011-0411 class).

SECURITY: everything from the peer is untrusted. Lines are bounded before they are complete; a
peer that keeps sending nonsense is disconnected after MAX_BAD_COMMANDS; authentication is only
offered when `auth_allowed` (TLS, or a policy exception the application grants).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Literal, assert_never

from mailhaven.proto import sasl
from mailhaven.proto.pop3_events import (
    ConnectionClosed,
    Dele,
    Event,
    ListMessages,
    Login,
    Quit,
    Retr,
    Rset,
    StartTls,
    Stat,
    Top,
    Uidl,
)
from mailhaven.proto.sansio import NEED_DATA, UsageError, Wait

__all__ = [
    "COMMANDS",
    "NEED_DATA",
    "BodyEncoder",
    "Connection",
    "ConnectionClosed",
    "CrlfCounter",
    "Dele",
    "Event",
    "ListMessages",
    "Login",
    "Quit",
    "RespCode",
    "Retr",
    "Rset",
    "StartTls",
    "Stat",
    "State",
    "Top",
    "Uidl",
    "UsageError",
    "Wait",
]

#: RFC 2449 §4: a command line is at most 255 octets including CRLF.
MAX_COMMAND_LINE = 255
#: PASS and SASL lines carry secrets of the user's choosing (RFC 1939 §7 lets a password hold
#: spaces; base64 grows it by a third), so they may run longer: as long as a SASL response may
#: be (RFC 4954 §4's 12288 octets, which proto.sasl enforces), plus the `AUTH PLAIN ` prefix.
MAX_AUTH_LINE = sasl.MAX_RESPONSE_LINE + 64
#: RFC 2449 §4: a response line is at most 512 octets including CRLF.
MAX_RESPONSE_LINE = 512
#: Bad or unknown commands tolerated before we hang up (Dovecot uses a similar counter).
MAX_BAD_COMMANDS = 10
#: Failed logins tolerated on one connection before we hang up.
MAX_AUTH_FAILURES = 3
#: RFC 1939 §5: message numbers are decimal; this bounds the digits we bother parsing.
MAX_NUMBER_DIGITS = 10


class State(enum.Enum):
    """RFC 1939 §3 session states, plus CLOSED once the connection must end."""

    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"
    CLOSED = "CLOSED"


#: The transition table as data: which keywords each state accepts (RFC 1939 §4-6, RFC 2449,
#: RFC 2595, RFC 5034). APOP is parsed so it can be refused explicitly.
COMMANDS: dict[State, frozenset[str]] = {
    State.AUTHORIZATION: frozenset({"USER", "PASS", "AUTH", "APOP", "STLS", "CAPA", "QUIT"}),
    State.TRANSACTION: frozenset(
        {"STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "QUIT", "TOP", "UIDL", "CAPA"}
    ),
    State.UPDATE: frozenset(),
    State.CLOSED: frozenset(),
}
KNOWN_COMMANDS = frozenset().union(*COMMANDS.values())


class RespCode(enum.Enum):
    """Extended response codes: RFC 2449 §8 (IN-USE, LOGIN-DELAY) and RFC 3206 (AUTH, SYS/*)."""

    AUTH = "AUTH"
    IN_USE = "IN-USE"
    LOGIN_DELAY = "LOGIN-DELAY"
    SYS_TEMP = "SYS/TEMP"
    SYS_PERM = "SYS/PERM"


# --------------------------------------------------------------------------------- body encoding
class BodyEncoder:
    """Stored message bytes (LF or CRLF lines) -> POP3 multi-line body (CRLF, dot-stuffed).

    Stateful across chunks so a CR/LF pair or a line-initial dot split between reads is handled.
    With `body_lines` set (TOP), output stops after the header and that many body lines, and
    `done` turns true so the caller can stop reading the file.
    """

    def __init__(self, body_lines: int | None = None) -> None:
        self._limit = body_lines
        self._held_cr = False
        self._line_start = True
        self._in_body = False
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        if self.done or not chunk:
            return b""
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            chunk, self._held_cr = chunk[:-1], True
        data = chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if self._limit is not None:
            data = self._cut(data)
        if not data:
            return b""
        stuffed = data.replace(b"\r\n.", b"\r\n..")
        if self._line_start and stuffed.startswith(b"."):
            stuffed = b"." + stuffed
        self._line_start = stuffed.endswith(b"\n")
        return stuffed

    def _cut(self, data: bytes) -> bytes:
        """Keep the header and `_limit` body lines of `data` (CRLF-normalised); set `done`."""
        assert self._limit is not None
        pos, line_start = 0, self._line_start
        while pos < len(data):
            if self._in_body and self._limit == 0:
                self.done = True
                return data[:pos]
            end = data.find(b"\r\n", pos)
            if end < 0:
                break
            if self._in_body:
                self._limit -= 1
            elif line_start and end == pos:
                self._in_body = True
            pos, line_start = end + 2, True
        if self._in_body and self._limit == 0:
            self.done = True
        return data

    def finish(self) -> bytes:
        """The end of the body: close an unterminated last line, then the `.` terminator."""
        tail = b"\r\n" if self._held_cr and not self.done else b""
        if not tail and not self._line_start:
            tail = b"\r\n"
        self._held_cr, self._line_start, self.done = False, True, True
        return tail + b".\r\n"


class CrlfCounter:
    """Counts the CRLF size of stored bytes (RFC 1939 §11: sizes are in network octets)."""

    def __init__(self) -> None:
        self.size = 0
        self._last_cr = False

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        bare_lf = chunk.count(b"\n") - chunk.count(b"\r\n")
        if self._last_cr and chunk.startswith(b"\n"):
            bare_lf -= 1
        self.size += len(chunk) + bare_lf
        self._last_cr = chunk.endswith(b"\r")


# ------------------------------------------------------------------------------------ connection
class Connection:
    """One POP3 server connection. See the module docstring for the calling convention."""

    def __init__(
        self,
        greeting: str,
        *,
        tls_available: bool,
        tls_active: bool = False,
        insecure_auth: bool = False,
        implementation: str = "mailhaven",
        policy: tuple[str, ...] = (),
    ) -> None:
        self.state = State.AUTHORIZATION
        #: RFC 2449 §6.5/§6.7 capabilities the application announces, e.g. "LOGIN-DELAY 900"
        self._policy = policy
        self.tls_active = tls_active
        self._tls_available = tls_available
        self._insecure_auth = insecure_auth
        self._implementation = implementation
        self._in = bytearray()
        self._scanned = 0
        self._discarding = False  # inside an over-long line, skipping up to its LF
        self._eof = False
        self._out = bytearray()
        self._pending: Event | None = None
        self._user: str | None = None
        self._sasl: sasl.SaslExchange | None = None  # an AUTH exchange awaiting a client line
        self.bad_commands = 0
        self.auth_failures = 0
        self._reply(True, greeting)

    # -- input ---------------------------------------------------------------------------------
    @property
    def auth_allowed(self) -> bool:
        return self.tls_active or self._insecure_auth

    @property
    def bytes_buffered(self) -> int:
        return len(self._in)

    def receive_data(self, data: bytes) -> None:
        if self._eof and data:
            raise UsageError("data after EOF")
        if not data:
            self._eof = True
        elif self.state is not State.CLOSED:
            self._in += data

    def next_event(self) -> Event | Literal[Wait.NEED_DATA]:
        if self._pending is not None:
            raise UsageError(f"{self._pending!r} has not been answered")
        while self.state is not State.CLOSED:
            line = self._next_line()
            if line is None:
                if self._eof:
                    self.state = State.CLOSED
                    break
                return NEED_DATA
            event = self._handle_line(line)
            if event is not None:
                self._pending = event
                return event
        return ConnectionClosed()

    def _next_line(self) -> bytes | None:
        while True:
            lf = self._in.find(b"\n", self._scanned)
            if lf < 0:
                if len(self._in) > MAX_AUTH_LINE:
                    del self._in[:]
                    self._discarding = True
                self._scanned = len(self._in)
                return None
            line = bytes(self._in[:lf]).removesuffix(b"\r")
            del self._in[: lf + 1]
            self._scanned = 0
            # The bound holds for a line that came whole, too: one read must not pass what
            # several reads would discard (see above).
            if self._discarding or lf > MAX_AUTH_LINE:
                self._discarding, self._sasl = False, None
                self._bad("Line too long")
                if self.state is State.CLOSED:
                    return None
                continue
            return line

    def _handle_line(self, raw: bytes) -> Event | None:
        if self._sasl is not None:
            return self._sasl_step(self._sasl.respond(raw))
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._bad("Invalid UTF-8 in command")
            return None
        keyword, _, arg = line.partition(" ")
        keyword = keyword.upper()
        if len(raw) + 2 > MAX_COMMAND_LINE and keyword not in ("PASS", "AUTH"):
            self._bad("Line too long")
            return None
        if "\0" in line:  # never part of a name or argument (RFC 1939 §3: printable ASCII)
            self._bad("NUL character in command")
            return None
        if keyword not in KNOWN_COMMANDS:
            self._bad("Unknown command")
            return None
        if keyword not in COMMANDS[self.state]:
            self._bad("Command not valid in this state")
            return None
        return self._dispatch(keyword, arg)

    def _dispatch(self, keyword: str, arg: str) -> Event | None:
        if keyword in ("USER", "PASS", "AUTH", "APOP") and not self.auth_allowed:
            self._reply(
                False,
                "Plaintext authentication disallowed on non-secure connections",
                RespCode.AUTH,
            )
            return None
        match keyword:
            case "CAPA":
                self._multiline("Capability list follows", self._capabilities())
            case "QUIT" if self.state is State.AUTHORIZATION:
                self._reply(True, "Logging out")
                self.state = State.CLOSED
            case "QUIT":
                self.state = State.UPDATE
                return Quit()
            case "NOOP":
                self._reply(True, "")
            case "STLS":
                return self._stls()
            case "USER":
                if not arg.strip():
                    self._bad("USER needs a name")
                    return None
                self._user = arg.strip()
                self._reply(True, "")
            case "PASS":
                if self._user is None:
                    self._bad("No user name given")
                    return None
                user, self._user = self._user, None
                return Login(user, arg, "USER")
            case "APOP":
                self._reply(False, "APOP is not supported")
            case "AUTH":
                return self._auth(arg)
            case "STAT" | "RSET" | "LIST" | "UIDL" | "RETR" | "DELE" | "TOP":
                return self._transaction(keyword, arg.split())
            case _:  # pragma: no cover - KNOWN_COMMANDS and this match agree
                raise AssertionError(keyword)
        return None

    def _transaction(self, keyword: str, args: list[str]) -> Event | None:
        nums = [_number(a) for a in args]
        if any(n is None for n in nums):
            self._bad("Invalid argument")
            return None
        match keyword, [n for n in nums if n is not None]:
            case "STAT", []:
                return Stat()
            case "RSET", []:
                return Rset()
            case "LIST", [] | [_]:
                return ListMessages(nums[0] if nums else None)
            case "UIDL", [] | [_]:
                return Uidl(nums[0] if nums else None)
            case "RETR", [n]:
                return Retr(n)
            case "DELE", [n]:
                return Dele(n)
            case "TOP", [n, lines]:
                return Top(n, lines)
        self._bad("Wrong number of arguments")
        return None

    def _stls(self) -> Event | None:
        if self.tls_active:
            self._reply(False, "TLS is already active")
            return None
        if not self._tls_available:
            self._reply(False, "TLS is not available")
            return None
        self._reply(True, "Begin TLS negotiation now")
        self._user = None
        self._discard_input()
        return StartTls()

    def _auth(self, arg: str) -> Event | None:
        mechanism, _, initial = arg.strip().partition(" ")
        if not mechanism:
            self._multiline("", sasl.SUPPORTED_MECHANISMS)  # the listing older clients ask for
            return None
        self._sasl = sasl.SaslExchange()
        return self._sasl_step(self._sasl.start(mechanism, initial or None))

    def _sasl_step(self, step: sasl.Step) -> Event | None:
        """Turn a step of the shared SASL machine (proto.sasl) into POP3 (RFC 5034 §4)."""
        match step:
            case sasl.Challenge():
                self._out += f"+ {step.encoded}\r\n".encode("ascii")  # "+ " alone: empty
                return None
            case sasl.Credentials(mechanism, authcid, password, authzid):
                self._sasl = None
                return Login(authcid, password, mechanism, authzid or "")
            case sasl.Failure(reason):
                self._sasl = None
                match reason:
                    case sasl.FailureReason.ABORTED:
                        self._reply(False, "Authentication cancelled")
                    case sasl.FailureReason.AUTHZID_NOT_ALLOWED:
                        self._reply(False, "Authorization identity not permitted", RespCode.AUTH)
                    case _:
                        self._bad(_SASL_ERRORS.get(reason, "Authentication failed"))
                return None
            case _:
                assert_never(step)

    def _capabilities(self) -> list[str]:
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.state is State.AUTHORIZATION:
            if self.auth_allowed:
                caps += ["USER", " ".join(("SASL", *sasl.SUPPORTED_MECHANISMS))]
            if self._tls_available and not self.tls_active:
                caps.append("STLS")
        caps += self._policy
        caps.append(f"IMPLEMENTATION {self._implementation}")
        return caps

    def _bad(self, text: str) -> None:
        self.bad_commands += 1
        if self.bad_commands >= MAX_BAD_COMMANDS:
            self._reply(False, "Too many bad commands, closing connection")
            self.state = State.CLOSED
        else:
            self._reply(False, text)

    def _discard_input(self) -> None:
        del self._in[:]
        self._scanned = 0
        self._discarding = False

    # -- answers -------------------------------------------------------------------------------
    def _answered(self, *kinds: type) -> Event:
        event = self._pending
        if event is None or not isinstance(event, kinds):
            raise UsageError(f"no pending {kinds} to answer (pending: {event!r})")
        self._pending = None
        return event

    def tls_started(self) -> None:
        """Call right before handing the transport to TLS: drop plaintext, mark TLS active."""
        self._answered(StartTls)
        self._discard_input()
        self.tls_active = True

    def accept_login(self, text: str = "Logged in") -> None:
        self._answered(Login)
        self.state = State.TRANSACTION
        self._reply(True, text)

    def reject_login(self, code: RespCode | None, text: str) -> None:
        self._answered(Login)
        self.auth_failures += 1
        if self.auth_failures >= MAX_AUTH_FAILURES:
            self.state = State.CLOSED
        self._reply(False, text, code)

    def ok(self, text: str = "") -> None:
        self._finish_answer(self._answered(Stat, ListMessages, Uidl, Dele, Rset, Quit))
        self._reply(True, text)

    def err(self, text: str, code: RespCode | None = None) -> None:
        event = self._answered(Stat, ListMessages, Uidl, Retr, Top, Dele, Rset, Quit)
        self._finish_answer(event)
        self._reply(False, text, code)

    def listing(self, text: str, lines: Iterable[str]) -> None:
        self._answered(ListMessages, Uidl)
        self._multiline(text, lines)

    def message_begin(self, text: str) -> BodyEncoder:
        """Answer RETR/TOP with `+OK`; then `message_data` each chunk and `message_end`."""
        event = self._answered(Retr, Top)
        self._reply(True, text)
        return BodyEncoder(event.lines if isinstance(event, Top) else None)

    def message_data(self, encoder: BodyEncoder, chunk: bytes) -> None:
        self._out += encoder.feed(chunk)

    def message_end(self, encoder: BodyEncoder) -> None:
        self._out += encoder.finish()

    def _finish_answer(self, event: Event) -> None:
        if isinstance(event, Quit):
            self.state = State.CLOSED

    def close(self, text: str, code: RespCode | None = None) -> None:
        """End the session from our side (idle timeout, shutdown): a final `-ERR`, no UPDATE."""
        if self.state is not State.CLOSED:
            self._pending = None
            self._reply(False, text, code)
            self.state = State.CLOSED

    # -- output --------------------------------------------------------------------------------
    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        del self._out[:]
        return out

    def _reply(self, positive: bool, text: str, code: RespCode | None = None) -> None:
        status = "+OK" if positive else "-ERR"
        parts = [status, f"[{code.value}]" if code else "", text]
        line = " ".join(p for p in parts if p).encode("utf-8", "replace")
        self._out += line[: MAX_RESPONSE_LINE - 2] + b"\r\n"

    def _multiline(self, text: str, lines: Iterable[str]) -> None:
        self._reply(True, text)
        for line in lines:
            data = line.encode("utf-8", "replace")
            self._out += (b"." + data if data.startswith(b".") else data) + b"\r\n"
        self._out += b".\r\n"


_SASL_ERRORS = {
    sasl.FailureReason.UNSUPPORTED_MECHANISM: "Unsupported authentication mechanism",
    sasl.FailureReason.BAD_BASE64: "Invalid base64 data",
    sasl.FailureReason.LINE_TOO_LONG: "SASL response too long",
    sasl.FailureReason.MALFORMED: "Malformed SASL response",
}


def _number(arg: str) -> int | None:
    """A non-negative decimal as RFC 1939 writes them; anything else is None."""
    if not arg.isascii() or not arg.isdigit() or len(arg) > MAX_NUMBER_DIGITS:
        return None
    return int(arg)
