"""SASL server exchanges for PLAIN and LOGIN, as a sans-I/O step machine.

Role: parse a client's SASL exchange (RFC 4422) for SMTP AUTH (RFC 4954) and POP3 AUTH
(RFC 5034) alike. It turns the client's lines into one of three values:

* `Challenge(data)`: send `data` to the client and feed its next line to `respond()`;
* `Credentials(authzid, authcid, password)`: the exchange is complete, go and verify them;
* `Failure(reason, detail)`: the exchange is over and failed; `smtp_reply()` renders it.

Framing is the caller's: challenges hold the *raw* bytes (e.g. b"Username:"); the caller sends
`challenge.encoded` (base64, ASCII) after `334 ` in SMTP or `+ ` in POP3. Client lines are given
without their CRLF, still base64-encoded; this module decodes them.

Mechanisms: PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login-00), both with or without an
initial response. In RFC 4954 §4 an initial response of `=` means "empty"; a line `*` cancels.

Invariants: after `Credentials` or `Failure` the exchange is finished and refuses further input
(a caller bug, so it raises `SaslStateError`). Nothing here compares a password: verification
needs the user database and may be slow, so it belongs to the (async) caller, who must also
refuse AUTH on a cleartext channel if policy says so.

Trust: every client byte is hostile. Lines are bounded (`MAX_RESPONSE_LINE`), base64 is decoded
strictly, and identities must be valid UTF-8 without NUL. `Credentials.__repr__` hides the
password so it never reaches a log by accident.
"""

from __future__ import annotations

import binascii
import enum
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import assert_never

from mailhaven.proto import replies as r
from mailhaven.proto.replies import Reply

#: RFC 4954 §4: "the maximum line length of a client response is 12288 octets" (base64 text).
MAX_RESPONSE_LINE = 12288

#: What a server offers by default, in order of preference for the EHLO keyword list.
SUPPORTED_MECHANISMS: tuple[str, ...] = ("PLAIN", "LOGIN")

#: draft-murchison-sasl-login §2: the challenges every LOGIN client expects, byte for byte.
LOGIN_USERNAME_CHALLENGE = b"Username:"
LOGIN_PASSWORD_CHALLENGE = b"Password:"


class SaslStateError(RuntimeError):
    """The caller fed a finished (or never started) exchange: a programming error."""


class FailureReason(enum.Enum):
    """Why an exchange failed; each maps to one SMTP reply (RFC 4954 §6)."""

    UNSUPPORTED_MECHANISM = "unsupported-mechanism"
    BAD_BASE64 = "bad-base64"
    ABORTED = "aborted"
    LINE_TOO_LONG = "line-too-long"
    MALFORMED = "malformed"
    AUTHZID_NOT_ALLOWED = "authzid-not-allowed"


@dataclass(frozen=True, slots=True)
class Challenge:
    """Server data to send before the client's next line. `data` is raw, not base64."""

    data: bytes

    @property
    def encoded(self) -> str:
        """The base64 text to put after `334 ` (SMTP) or `+ ` (POP3); empty for no data."""
        return binascii.b2a_base64(self.data, newline=False).decode("ascii")


@dataclass(frozen=True, slots=True)
class Credentials:
    """A complete exchange: who logs in (authcid), as whom (authzid) and with what password.

    `authzid` is None when the client asked for no other identity (always so for LOGIN).
    """

    mechanism: str
    authcid: str
    password: str = field(repr=False)
    authzid: str | None = None

    @property
    def identity(self) -> str:
        """The identity the session acts as once the password is verified."""
        return self.authzid if self.authzid is not None else self.authcid


@dataclass(frozen=True, slots=True)
class Failure:
    """The exchange is over and did not produce credentials."""

    reason: FailureReason
    detail: str = ""


Step = Challenge | Credentials | Failure


class _State(enum.Enum):
    START = enum.auto()
    PLAIN_RESPONSE = enum.auto()
    LOGIN_USERNAME = enum.auto()
    LOGIN_PASSWORD = enum.auto()
    DONE = enum.auto()


class SaslExchange:
    """One server-side SASL exchange: `start()` once, then `respond()` per client line.

    `allow_authzid` lets PLAIN clients ask for an authorization identity different from their
    authentication identity (a proxy login). It is off by default because accepting it safely
    needs a policy ("may alice act as bob?") that the caller must apply to `Credentials.authzid`.
    """

    def __init__(
        self,
        *,
        offered: Collection[str] = SUPPORTED_MECHANISMS,
        allow_authzid: bool = False,
    ) -> None:
        self._offered = frozenset(m.upper() for m in offered) & frozenset(SUPPORTED_MECHANISMS)
        self._allow_authzid = allow_authzid
        self._state = _State.START
        self._mechanism = ""
        self._username = ""

    @property
    def mechanism(self) -> str:
        """The mechanism chosen by `start()` (upper case), or "" before it."""
        return self._mechanism

    @property
    def finished(self) -> bool:
        return self._state is _State.DONE

    def start(self, mechanism: str, initial_response: str | bytes | None = None) -> Step:
        """Begin with `AUTH <mechanism> [initial-response]`; `=` is an empty initial response."""
        if self._state is not _State.START:
            raise SaslStateError("start() called twice")
        name = mechanism.upper()
        if name not in self._offered:
            return self._finish(Failure(FailureReason.UNSUPPORTED_MECHANISM, name))
        self._mechanism = name
        self._state = _State.PLAIN_RESPONSE if name == "PLAIN" else _State.LOGIN_USERNAME
        if initial_response is None:
            return self._prompt()
        raw = _as_bytes(initial_response)
        if raw == b"=":
            return self._advance(b"")
        return self._feed(raw)

    def respond(self, line: str | bytes) -> Step:
        """Feed one client line (without CRLF) in answer to the last `Challenge`."""
        if self._state in (_State.START, _State.DONE):
            raise SaslStateError(f"respond() in state {self._state.name}")
        raw = _as_bytes(line)
        if raw == b"*":
            return self._finish(Failure(FailureReason.ABORTED))
        return self._feed(raw)

    # -- internals -----------------------------------------------------------------------

    def _feed(self, raw: bytes) -> Step:
        if len(raw) > MAX_RESPONSE_LINE:
            return self._finish(Failure(FailureReason.LINE_TOO_LONG, f"{len(raw)} octets"))
        try:
            decoded = binascii.a2b_base64(raw, strict_mode=True) if raw else b""
        except binascii.Error as exc:
            return self._finish(Failure(FailureReason.BAD_BASE64, str(exc)))
        # strict_mode still lets surplus padding ("YWJj=") and non-zero pad bits through;
        # only the canonical encoding (RFC 4648 §3.5) is accepted, so one text means one value.
        if binascii.b2a_base64(decoded, newline=False) != raw:
            return self._finish(Failure(FailureReason.BAD_BASE64, "non-canonical base64"))
        return self._advance(decoded)

    def _prompt(self) -> Step:
        """The challenge for the current state when the client has not spoken yet."""
        match self._state:
            case _State.PLAIN_RESPONSE:
                return Challenge(b"")  # RFC 4616 §2: PLAIN starts with an empty challenge
            case _State.LOGIN_USERNAME:
                return Challenge(LOGIN_USERNAME_CHALLENGE)
            case _State.LOGIN_PASSWORD:
                return Challenge(LOGIN_PASSWORD_CHALLENGE)
            case _State.START | _State.DONE:
                raise SaslStateError(f"no prompt in state {self._state.name}")
            case _:
                assert_never(self._state)

    def _advance(self, data: bytes) -> Step:
        match self._state:
            case _State.PLAIN_RESPONSE:
                return self._finish(self._plain(data))
            case _State.LOGIN_USERNAME:
                username = _text(data)
                if not username:
                    return self._finish(Failure(FailureReason.MALFORMED, "bad LOGIN username"))
                self._username = username
                self._state = _State.LOGIN_PASSWORD
                return Challenge(LOGIN_PASSWORD_CHALLENGE)
            case _State.LOGIN_PASSWORD:
                password = _text(data)
                if password is None:
                    return self._finish(Failure(FailureReason.MALFORMED, "bad LOGIN password"))
                return self._finish(Credentials("LOGIN", self._username, password))
            case _State.START | _State.DONE:
                raise SaslStateError(f"no input expected in state {self._state.name}")
            case _:
                assert_never(self._state)

    def _plain(self, data: bytes) -> Credentials | Failure:
        """RFC 4616 §2: message = [authzid] NUL authcid NUL passwd, all UTF-8, no other NUL."""
        parts = data.split(b"\x00")
        if len(parts) != 3:
            return Failure(FailureReason.MALFORMED, "PLAIN needs exactly two NUL separators")
        authzid, authcid, password = (_text(p) for p in parts)
        if authzid is None or not authcid or not password:
            return Failure(FailureReason.MALFORMED, "empty or non-UTF-8 PLAIN field")
        if authzid and authzid != authcid and not self._allow_authzid:
            return Failure(FailureReason.AUTHZID_NOT_ALLOWED, authzid)
        return Credentials("PLAIN", authcid, password, authzid or None)

    def _finish(self, step: Credentials | Failure) -> Credentials | Failure:
        self._state = _State.DONE
        return step


def _as_bytes(line: str | bytes) -> bytes:
    """Client lines may arrive as str from a line parser; non-ASCII can never be base64."""
    if isinstance(line, bytes):
        return line
    return line.encode("utf-8", "surrogateescape")


def _text(data: bytes) -> str | None:
    """Decode an identity or password; None when it is not UTF-8 or carries a NUL."""
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def smtp_reply(failure: Failure) -> Reply:
    """The SMTP reply for a failed exchange (RFC 4954 §4 and §6, RFC 3463)."""
    match failure.reason:
        case FailureReason.UNSUPPORTED_MECHANISM:
            return r.AUTH_UNKNOWN_MECHANISM
        case FailureReason.BAD_BASE64:
            return r.AUTH_BAD_BASE64
        case FailureReason.ABORTED:
            return r.AUTH_ABORTED
        case FailureReason.LINE_TOO_LONG:
            return r.AUTH_LINE_TOO_LONG
        case FailureReason.MALFORMED:
            return r.AUTH_CREDENTIALS_INVALID
        case FailureReason.AUTHZID_NOT_ALLOWED:
            return r.AUTHZID_NOT_PERMITTED
        case _:
            assert_never(failure.reason)
