"""What an SMTP server listener offers and how one command is read: pure functions.

In: a listener's `ServerSettings` and one raw command line. Out: the EHLO capability lines (the
one place they are built: the EHLO reply and the MAIL/RCPT parameter check both derive from
`capabilities`), the verdict on a line before its verb is looked up (`check_line`), the replies
that depend only on the listener (`unavailable`, `help_reply`), and each command's argument
parsed into its event or a refusal (`parse_*`). The command *sequence* is `proto.smtp_states`;
the session state is `proto.smtp_server`.

SECURITY: a command line is untrusted: its length is bounded per verb (RFC 5321 §4.5.3.1.4, with
the RFC 3461/4954 extensions), and NUL, bare CR and 8-bit octets outside addresses are refused
before any parsing.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailhaven.proto import replies as r
from mailhaven.proto import smtp_server_events as ev
from mailhaven.proto.address import AddressError, parse_mail_params, parse_path, parse_rcpt_params
from mailhaven.proto.replies import Reply
from mailhaven.proto.smtp_help import HELP_TEXT, ORDER

#: RFC 5321 §4.5.3.1.4: a command line is at most 512 octets with CRLF.
MAX_COMMAND_LINE = 512
#: RFC 3461 §5 and RFC 4954 §5 lengthen MAIL by ENVID (100) and AUTH= (500).
MAIL_LINE_EXTRA = 600
#: RFC 3461 §5: ORCPT lengthens RCPT by 500.
RCPT_LINE_EXTRA = 500
#: RFC 4954 §4: an AUTH line (command or response) may be 12288 octets.
MAX_AUTH_LINE = 12288
#: Verbs whose argument may hold a UTF-8 address (RFC 6531 §3.3); other verbs are ASCII.
_UTF8_VERBS = frozenset({"MAIL", "RCPT", "VRFY", "EXPN"})


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
    #: Speak LMTP (RFC 2033): LHLO instead of HELO/EHLO, one reply per recipient after the
    #: message.
    lmtp: bool = False


def auth_offered(settings: ServerSettings, tls: bool) -> bool:
    """AUTH is advertised and accepted (RFC 4954 §4: not in clear text unless configured)."""
    return bool(settings.auth_mechanisms) and (tls or not settings.auth_requires_tls)


def capabilities(settings: ServerSettings, tls: bool) -> tuple[str, ...]:
    """The EHLO/LHLO reply's lines after the host name, in the order Postfix lists them."""
    s = settings
    lines = []
    if s.pipelining:
        lines.append("PIPELINING")
    lines.append(f"SIZE {s.max_message_size}")
    if s.etrn:
        lines.append("ETRN")
    if s.starttls and not tls:
        lines.append("STARTTLS")
    if auth_offered(s, tls):
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
    return tuple(lines)


def keywords(settings: ServerSettings, tls: bool) -> frozenset[str]:
    """The ESMTP keywords of `capabilities` (what MAIL and RCPT parameters may use)."""
    return frozenset(line.split(" ", 1)[0] for line in capabilities(settings, tls))


def line_limit(settings: ServerSettings, verb: str) -> int:
    """The longest line (without CRLF) `verb` may come on."""
    if verb == "AUTH":
        return MAX_AUTH_LINE
    limit = settings.command_line_limit - 2
    if verb == "MAIL":
        return limit + MAIL_LINE_EXTRA
    if verb == "RCPT":
        return limit + RCPT_LINE_EXTRA
    return limit


def check_line(settings: ServerSettings, verb: str, raw: bytes) -> Reply | None:
    """Why the raw command line for `verb` is refused before its verb is looked at (or None)."""
    if len(raw) > line_limit(settings, verb):
        return r.LINE_TOO_LONG
    if b"\x00" in raw:
        return r.NUL_IN_COMMAND
    if b"\r" in raw:
        return r.BARE_CR_IN_COMMAND
    if not raw.isascii():
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return r.BAD_UTF8_IN_COMMAND
        if verb not in _UTF8_VERBS:
            return r.EIGHT_BIT_IN_COMMAND
    return None


def unavailable(settings: ServerSettings, verb: str, tls: bool) -> str | None:
    """Why `verb` answers 502 (or 554, 538) on this listener whatever the client does (None: it
    can work); HELP lists only what can work here."""
    s = settings
    match verb:
        case "HELO" | "EHLO" if s.lmtp:
            return "this is LMTP: use LHLO"
        case "LHLO" if not s.lmtp:
            return "LMTP only"
        case "STARTTLS" if tls:
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


def refuse_unavailable(settings: ServerSettings, verb: str, tls: bool) -> Reply | None:
    """The reply for a command this listener cannot run now whatever the sequence: checked
    before the transition table, like Postfix's "not implemented" answers."""
    match verb:
        case "STARTTLS" if not settings.starttls:
            return r.NOT_IMPLEMENTED
        case "STARTTLS" if tls:
            return r.TLS_ACTIVE
        case "ETRN" if not settings.etrn:
            return r.NOT_IMPLEMENTED
        case "AUTH" if not settings.auth_mechanisms:
            return r.AUTH_NOT_ENABLED
        case "AUTH" if not auth_offered(settings, tls):
            return r.AUTH_NEEDS_TLS
    return None


def help_reply(settings: ServerSettings, argument: str, tls: bool) -> Reply:
    """HELP (RFC 5321 §4.1.1.8): the commands that work here, or one command explained."""
    if not argument:
        names = " ".join(v for v in ORDER if unavailable(settings, v, tls) is None)
        return r.help_commands(names)
    verb = argument.upper()
    text = HELP_TEXT.get(verb)
    if text is None:
        return r.help_unknown(argument)
    why = unavailable(settings, verb, tls)
    if why is not None:
        text = f"{text}; not available here: {why}"
    return r.help_text(text)


def parse_bdat(argument: str) -> tuple[int, bool] | None:
    """`size [LAST]` (RFC 3030 §2) as (size, last); None when it does not parse."""
    parts = argument.split(" ")
    last = len(parts) == 2 and parts[1].upper() == "LAST"
    if not parts[0].isdigit() or len(parts[0]) > 18 or not (len(parts) == 1 or last):
        return None
    return int(parts[0]), last


# ------------------------------------------------------------------------ command arguments
# Each parser turns one command's argument into its event, or into the reply refusing it. They
# see no session state beyond what they are given: the sequence was checked before.


def parse_hello(verb: str, arg: str) -> ev.Hello | Reply:
    """HELO/EHLO/LHLO domain (RFC 5321 §4.1.1.1, RFC 2033 §4.1)."""
    if not arg or " " in arg.strip():
        return r.syntax(f"{verb} hostname")
    return ev.Hello(arg, verb != "HELO")


def parse_mail(
    arg: str, advertised: frozenset[str], settings: ServerSettings
) -> ev.MailFrom | Reply:
    """MAIL FROM:<path> [parameters] (RFC 5321 §4.1.1.2; SIZE, BODY, SMTPUTF8, RET, ENVID)."""
    if arg[:5].upper() != "FROM:":
        return r.syntax("MAIL FROM:<address>")
    try:
        address, params_text = parse_path(arg[5:], null_ok=True, utf8=True)
        params = parse_mail_params(params_text, extensions=advertised)
    except AddressError as err:
        return err.reply
    if not address.isascii() and not params.smtputf8:
        return r.NEEDS_SMTPUTF8
    if params.size is not None and params.size > settings.max_message_size:
        return r.SIZE_EXCEEDED
    return ev.MailFrom(address, params)


def parse_rcpt(arg: str, advertised: frozenset[str], *, smtputf8: bool) -> ev.RcptTo | Reply:
    """RCPT TO:<path> [parameters] (RFC 5321 §4.1.1.3; NOTIFY, ORCPT); `smtputf8` is MAIL's."""
    if arg[:3].upper() != "TO:":
        return r.syntax("RCPT TO:<address>")
    try:
        address, params_text = parse_path(
            arg[3:], null_ok=False, utf8=True, bare_postmaster_ok=True
        )
        if not address.isascii() and not smtputf8:
            return r.NEEDS_SMTPUTF8
        params = parse_rcpt_params(params_text, extensions=advertised)
    except AddressError as err:
        return err.reply
    return ev.RcptTo(address, params)


def parse_lookup(verb: str, arg: str) -> ev.Verify | ev.Expand | Reply:
    """VRFY or EXPN with its argument (RFC 5321 §4.1.1.6, §4.1.1.7)."""
    if not arg:
        return r.syntax(f"{verb} address")
    return ev.Verify(arg) if verb == "VRFY" else ev.Expand(arg)


def parse_etrn(arg: str) -> ev.Etrn | Reply:
    """ETRN domain | @domain | #queue (RFC 1985)."""
    if not arg or " " in arg:
        return r.ETRN_SYNTAX
    return ev.Etrn(arg)


def parse_auth(arg: str, mechanisms: tuple[str, ...]) -> ev.AuthStart | Reply:
    """AUTH mechanism [initial-response] (RFC 4954 §4)."""
    mech, _, initial = arg.partition(" ")
    if not mech or " " in initial:
        return r.syntax("AUTH mechanism [initial-response]")
    if mech.upper() not in mechanisms:
        return r.AUTH_UNKNOWN_MECHANISM
    return ev.AuthStart(mech.upper(), initial or None)
