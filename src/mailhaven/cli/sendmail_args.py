"""The `sendmail` command line, parsed the way Postfix's sendmail(1) parses it.

Role: turn argv (without the program name) into a frozen `SendmailArgs`, or raise `UsageError`,
after which the caller prints `<prog>: fatal: <message>` and exits `EX_USAGE` (64). Nothing is
read, sent or looked up here; the caller acts on the result. This module sits on the fast path
of every cron job and PHP `mail()` call, so it imports only `dataclasses` and `typing`.

Grammar: POSIX getopt over Postfix's option string (`_FLAGS`, `_WITH_ARGUMENT` below). Flags
may be clustered (`-ti`), arguments glued (`-fme@x`, `-oi`, `-bs`) or separate (`-f me@x`). Parsing stops at `--` or at the first non-option (so `sendmail a@b -i` has two
recipients, as with Postfix on Linux). Two words are not getopt-shaped and are matched first,
as Postfix does: a bare `-q` (flush the queue) and `-XV` (VERP, ignored here).

Compatibility choices, each Postfix's unless said otherwise:
* `-q1h` (an interval) asks for a queue-runner daemon; outside `-bd` it is a no-op, mode
  `ignore` (the caller exits 0). `-qR site` / `-qI id` flush one site / one message.
* `-bh`, `-bH` have no meaning here: mode `ignore`. `-bd` gives mode `daemon`, which the
  caller refuses (use `mailhaven serve`).
* A bad `-N` value, or a `-V` value that is too long or not printable, is ignored with a
  warning (in `warnings`), not fatal.
* `-R full|hdrs` sets RET= (Sendmail 8's meaning; Postfix ignores -R). Other values are fatal.
* `-n`, `-X` and the many historical options (`-A -G -L -O -U -c -e -h -m -p -x`, `-o` other than
  `-oi` / `-oA`) are accepted and ignored; they are listed in `ignored` for `-v` logging.
  Postfix makes `-n` fatal; ignoring it keeps old scripts working.
* Deliver mode with no recipient and no `-t` is refused here, before stdin is read (Postfix
  refuses the same after reading it).

Trust: argv comes from a local, possibly unprivileged, user. Values that end up in the envelope
or headers (`-f`, `-F`, `-V`) are refused or ignored when they hold control characters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: sysexits.h: the command was used incorrectly.
EX_USAGE = 64

#: RFC 3461 §4.4: "the ENVID ... MUST NOT exceed 100 characters" (Postfix's -V limit too).
MAX_ENVID_LENGTH = 100

Mode = Literal["deliver", "smtp", "mailq", "flush", "newaliases", "verify", "daemon", "ignore"]

#: Options without an argument, and options with one: Postfix's GETOPT_LIST
#: "A:B:C:F:GIL:N:O:R:UV:X:b:ce:f:h:imno:p:r:q:tvx".
_FLAGS = frozenset("GIUcimntvx")
_WITH_ARGUMENT = frozenset("ABCFLNORVXbefhopqr")
_NOTIFY_WORDS = ("SUCCESS", "DELAY", "FAILURE")


class UsageError(ValueError):
    """The command line cannot be obeyed; the message is in sendmail's words."""


@dataclass(frozen=True, slots=True)
class SendmailArgs:
    """What the command line asked for. Defaults are what a bare `sendmail user` means."""

    mode: Mode = "deliver"
    recipients: tuple[str, ...] = ()
    #: -t: add the To:, Cc: and Bcc: addresses of the message (Bcc: is then removed).
    recipients_from_headers: bool = False
    #: -i / -oi: a line with a lone "." is data, not the end of input.
    ignore_dots: bool = False
    #: -f / -r, without angle brackets. None: not given (use the login name); "": null sender.
    sender: str | None = None
    #: -F: the full name for a From: header that the caller synthesises.
    full_name: str | None = None
    #: -N, as in RecipientSpec.notify: ("NEVER",) or a subset of SUCCESS, DELAY, FAILURE.
    dsn_notify: tuple[str, ...] = ()
    dsn_ret: Literal["FULL", "HDRS"] | None = None
    dsn_envid: str | None = None
    body_type: Literal["7BIT", "8BITMIME"] | None = None
    #: -C: a configuration file or its directory; the caller resolves which.
    config_dir: str | None = None
    #: -oA: the alias database for -bi / newaliases.
    alias_database: str | None = None
    #: How many -v: one asks for a delivery report in deliver mode, more for verbose logging.
    verbose: int = 0
    #: -qR site / -qI queue id, when mode is "flush"; both None: flush everything.
    flush_site: str | None = None
    flush_queue_id: str | None = None
    #: -q<interval>, e.g. "30m"; acted on only in daemon mode.
    queue_interval: str | None = None
    #: Options accepted and ignored, as given (e.g. "-oem", "-L label").
    ignored: tuple[str, ...] = ()
    #: Messages for stderr about options that were dropped without failing.
    warnings: tuple[str, ...] = ()


def default_mode(prog: str) -> Mode:
    """Postfix picks the mode from its name: `mailq` lists, `newaliases` rebuilds aliases."""
    match prog.rsplit("/", 1)[-1]:
        case "mailq":
            return "mailq"
        case "newaliases":
            return "newaliases"
        case _:
            return "deliver"


def parse_sendmail_args(argv: list[str] | tuple[str, ...], prog: str = "sendmail") -> SendmailArgs:
    """Parse `argv` (without the program name); `prog` is argv[0], which sets the default mode."""
    state = _Parse(mode=default_mode(prog))
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-q":  # not getopt compatible: "-q" alone flushes, "-q1h" is an interval
            if state.mode == "daemon":
                state.warnings.append("ignoring -q option in daemon mode")
            else:
                state.mode = "flush"
            i += 1
            continue
        if arg == "-XV":
            state.ignored.append(arg)
            i += 1
            continue
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        i = _parse_cluster(state, args, i)
    return state.finish(tuple(args[i:]))


def _parse_cluster(state: _Parse, args: list[str], i: int) -> int:
    """Parse the option word args[i] (e.g. "-ti" or "-fme@x"); return the next index."""
    word = args[i]
    pos = 1
    while pos < len(word):
        opt = word[pos]
        if opt in _FLAGS:
            state.flag(opt)
            pos += 1
            continue
        if opt not in _WITH_ARGUMENT:
            raise UsageError(f"invalid option -- '{opt}'")
        if pos + 1 < len(word):
            state.option(opt, word[pos + 1 :])
            return i + 1
        if i + 1 >= len(args):
            raise UsageError(f"option requires an argument -- '{opt}'")
        state.option(opt, args[i + 1])
        return i + 2
    return i + 1


class _Parse:
    """The mutable accumulator behind one `parse_sendmail_args` call."""

    def __init__(self, mode: Mode) -> None:
        self.mode: Mode = mode
        self.verify = False
        self.from_headers = False
        self.ignore_dots = False
        self.sender: str | None = None
        self.full_name: str | None = None
        self.notify: tuple[str, ...] = ()
        self.ret: Literal["FULL", "HDRS"] | None = None
        self.envid: str | None = None
        self.body: Literal["7BIT", "8BITMIME"] | None = None
        self.config: str | None = None
        self.alias_db: str | None = None
        self.verbose = 0
        self.site: str | None = None
        self.queue_id: str | None = None
        self.interval: str | None = None
        self.ignored: list[str] = []
        self.warnings: list[str] = []

    def flag(self, opt: str) -> None:
        match opt:
            case "I":
                self.mode = "newaliases"
            case "i":
                self.ignore_dots = True
            case "t":
                self.from_headers = True
            case "v":
                self.verbose += 1
            case _:  # G U c m n x: historical, no effect here
                self.ignored.append(f"-{opt}")

    def option(self, opt: str, value: str) -> None:
        match opt:
            case "B":
                body = value.upper()
                if body not in ("7BIT", "8BITMIME"):
                    raise UsageError("-B option needs 8BITMIME or 7BIT")
                self.body = "7BIT" if body == "7BIT" else "8BITMIME"
            case "C":
                self.config = value
            case "F":
                if not value.isprintable():
                    raise UsageError("-F option specified a malformed full name")
                self.full_name = value
            case "N":
                self.notify = _parse_notify(value)
                if not self.notify:
                    self.warnings.append("bad -N option value -- ignored")
            case "R":
                ret = value.upper()
                if ret not in ("FULL", "HDRS"):
                    raise UsageError('-R option needs "full" or "hdrs"')
                self.ret = "FULL" if ret == "FULL" else "HDRS"
            case "V":
                if len(value) > MAX_ENVID_LENGTH:
                    self.warnings.append("too long -V option value -- ignored")
                elif not value.isascii() or not value.isprintable():
                    self.warnings.append("bad syntax in -V option value -- ignored")
                else:
                    self.envid = value
            case "b":
                self._mode_option(value)
            case "f" | "r":
                self.sender = _parse_sender(value)
            case "o":
                self._o_option(value)
            case "q":
                self._q_option(value)
            case _:  # A L O X e h p: historical, no effect here
                self.ignored.append(f"-{opt} {value}" if opt in "ALOhp" else f"-{opt}{value}")

    def _mode_option(self, value: str) -> None:
        match value[:1]:
            case "d":
                if self.mode == "flush":
                    self.warnings.append("ignoring -q option in daemon mode")
                self.mode = "daemon"
            case "h" | "H":
                self.mode = "ignore"
            case "i":
                self.mode = "newaliases"
            case "m":
                self.mode = "deliver"
            case "p":
                self.mode = "mailq"
            case "s":
                self.mode = "smtp"
            case "v":
                self.verify = True
            case _:
                raise UsageError(f"unsupported: -b{value[:1]}")

    def _o_option(self, value: str) -> None:
        match value[:1]:
            case "i":
                self.ignore_dots = True
            case "A":
                if len(value) == 1:
                    raise UsageError("-oA requires pathname")
                self.alias_db = value[1:]
            case _:
                self.ignored.append(f"-o{value}")

    def _q_option(self, value: str) -> None:
        if value[:1].isdigit():
            self.interval = value
        elif value[:1] == "R":
            if len(value) == 1:
                raise UsageError("specify: -qRsitename")
            self.site = value[1:]
        elif value[:1] == "I":
            if len(value) == 1:
                raise UsageError("specify: -qIqueueid")
            self.queue_id = value[1:]
        else:
            raise UsageError(f"-q{value[:1]} is not implemented")

    def finish(self, recipients: tuple[str, ...]) -> SendmailArgs:
        """Cross-option checks, in Postfix's order and words, then the frozen result."""
        if self.from_headers and self.mode != "deliver":
            raise UsageError("-t can be used only in delivery mode")
        if self.site is not None and self.mode != "deliver":
            raise UsageError("-qR can be used only in delivery mode")
        if self.queue_id is not None and self.mode != "deliver":
            raise UsageError("-qI can be used only in delivery mode")
        if self.verify:
            if self.from_headers:
                raise UsageError("-t option cannot be used with -bv")
            if self.notify:
                raise UsageError("-N option cannot be used with -bv")
            if self.verbose == 1:
                raise UsageError("-v option cannot be used with -bv")
        mode = self.mode
        if self.interval is not None and mode != "daemon":
            mode = "ignore"  # Postfix: a queue interval outside daemon mode does nothing
        elif self.site is not None or self.queue_id is not None:
            mode = "flush"
            if recipients:
                what = "site" if self.site is not None else "queue_id"
                raise UsageError(f"flush {what} requires no recipient")
        elif self.verify and mode == "deliver":
            mode = "verify"
        _check_recipients(mode, recipients, self.from_headers)
        return SendmailArgs(
            mode=mode,
            recipients=recipients,
            recipients_from_headers=self.from_headers,
            ignore_dots=self.ignore_dots,
            sender=self.sender,
            full_name=self.full_name,
            dsn_notify=self.notify,
            dsn_ret=self.ret,
            dsn_envid=self.envid,
            body_type=self.body,
            config_dir=self.config,
            alias_database=self.alias_db,
            verbose=self.verbose,
            flush_site=self.site,
            flush_queue_id=self.queue_id,
            queue_interval=self.interval,
            ignored=tuple(self.ignored),
            warnings=tuple(self.warnings),
        )


#: Postfix's complaint when a mode that takes no recipient is given some.
_NO_RECIPIENT_MESSAGES: dict[Mode, str] = {
    "mailq": "display queue mode requires no recipient",
    "flush": "flush queue mode requires no recipient",
    "daemon": "daemon mode requires no recipient",
    "newaliases": "alias initialization mode requires no recipient",
    "smtp": "stand-alone mode requires no recipient",
}


def _check_recipients(mode: Mode, recipients: tuple[str, ...], from_headers: bool) -> None:
    if recipients and mode in _NO_RECIPIENT_MESSAGES:
        raise UsageError(_NO_RECIPIENT_MESSAGES[mode])
    if mode in ("deliver", "verify") and not recipients and not from_headers:
        raise UsageError(
            "Recipient addresses must be specified on the command line or via the -t option"
        )


def _parse_notify(value: str) -> tuple[str, ...]:
    """`-N never` or `-N success,delay,failure` (any subset, any case); () when invalid."""
    words = [w.strip().upper() for w in value.split(",")]
    if words == ["NEVER"]:
        return ("NEVER",)
    if not words or any(w not in _NOTIFY_WORDS for w in words):
        return ()
    return tuple(w for w in _NOTIFY_WORDS if w in words)


def _parse_sender(value: str) -> str:
    """`-f<>`, `-f ''`, `-f '<a@b>'` and `-f 'Name <a@b>'` name the address inside the brackets."""
    if not value.isprintable():
        raise UsageError(f"-f option specified malformed sender: {value!r}")
    text = value.strip()
    if text.endswith(">") and "<" in text:
        text = text[text.rindex("<") + 1 : -1].strip()
    return text
