"""`mailhaven sendmail` (also as a `sendmail` or `mailq` symlink): local mail submission.

In: a sendmail(1) command line (parsed by `sendmail_args`, Postfix's rules) and the message on
stdin. Out: one file in the drop directory (`maildrop.py`), exit 0 only once it is durable, then
a best-effort poke of the daemon over the control socket. The daemon's pickup queues it; when the
daemon is down the file waits and is collected at start-up. Exit codes (sysexits.h):
0 queued; 64 EX_USAGE (bad options, no recipients); 65 EX_DATAERR (bad address in a header,
message over `limits.message_size`); 69 EX_UNAVAILABLE (-bv, -bd, or an error answer to -q);
75 EX_TEMPFAIL (the drop directory cannot be written: try again later); 78 EX_CONFIG.

Message handling (Postfix's sendmail + cleanup for local mail):
- line endings: LF, CRLF and bare CR all become CRLF, in chunks (the queue stores CRLF, as
  SMTP clients send it); a final line without a newline gets one; a leading mbox `From ` line
  is dropped;
- input ends at EOF, or at a line holding only "." unless -i/-oi (-t does not change this,
  as in Postfix); dots are never unstuffed;
- the header block (at most `HEADER_LIMIT` octets; a first non-header line starts the body, and
  a blank separator line is then inserted) is edited: `Bcc:`/`Resent-Bcc:` removed, `From:`
  (from -f or the login, with -F, $NAME or the passwd full name), `Date:` and `Message-ID:`
  added when missing;
- -t adds the To/Cc/Bcc addresses (the Resent- ones if any Resent- field exists) to the argv
  recipients, as Postfix does (Sendmail 8 would instead subtract the argv ones);
- unqualified addresses get `@<first local domain>` (Postfix's myorigin; that domain is local,
  so `sendmail root` reaches the local postmaster alias chain);
- -N/-R/-V/-B go into the envelope; a body with 8-bit octets and no -B becomes 8BITMIME.

-bs speaks SMTP on stdin/stdout through the sans-I/O core; each message gets the same header
treatment (not -t) and `250 2.0.0 Ok: queued as <drop id>` only after its file is durable.
Bare LF line ends from the local program become CRLF first (`printf ... | sendmail -bs`, as
Postfix takes them from a local pipe); input that ends inside DATA queues nothing, which is
said on stderr with exit 65 (EX_DATAERR), never a silent 0.
-bp prints the queue (`mailq` format), -q flushes through the daemon.

Start-up cost matters (cron jobs, PHP): only the standard library's cheap modules and
`mailhaven.config` load on the plain path; `email.utils` only for -t or unusual addresses.

SECURITY: runs with the caller's privileges and trusts nothing it reads; the daemon side
re-validates everything (see `pickup.py`). The drop file is created 0600, O_EXCL, O_NOFOLLOW.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

from mailhaven.cli.sendmail_args import EX_USAGE, SendmailArgs, UsageError, parse_sendmail_args
from mailhaven.pickup.dropfile import DropDirs, DropWriter

if TYPE_CHECKING:
    from mailhaven.config import Config
    from mailhaven.proto.replies import Reply

EX_OK = 0
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_CONFIG = 78

CHUNK = 64 * 1024
#: Postfix header_size_limit: past this, the rest counts as body.
HEADER_LIMIT = 102_400
#: A line longer than this without a newline is passed on in pieces (memory stays bounded).
MAX_CARRY = 64 * 1024
#: RFC 5321 §4.5.3.1.3: a path is at most 256 octets.
MAX_ADDRESS = 254
CRLF = b"\r\n"

_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_ATOM_PHRASE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\- ]*")
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class SubmitError(Exception):
    """The message cannot be queued; `status` is the exit code (mapped to SMTP under -bs)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class LineNormalizer:
    """Turns LF / CR / CRLF input into CRLF lines, chunk by chunk; optionally stops at a lone
    "." line (then `done` is True and the rest of the input is ignored)."""

    def __init__(self, *, dot_ends: bool) -> None:
        self.dot_ends = dot_ends
        self.done = False
        self._carry = b""
        self._at_line_start = True

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return b""
        data = self._carry + data
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            if len(data) <= MAX_CARRY:
                self._carry = data
                return b""
            cut = len(data) - 1 if data.endswith(b"\r") else len(data)  # CR may pair with LF
        block, self._carry = data[:cut], data[cut:]
        out = _crlf(block)
        start = self._at_line_start
        self._at_line_start = out.endswith(CRLF)
        if self.dot_ends:
            if start and out.startswith(b".\r\n"):
                end = 0
            else:
                end = out.find(b"\r\n.\r\n")
                end = end + 2 if end >= 0 else -1
            if end >= 0:
                self.done = True
                self._carry = b""
                return out[:end]
        return out

    def finish(self) -> bytes:
        """The last, unterminated line (with CRLF added), at end of input."""
        tail, self._carry = self._carry, b""
        if self.done or not tail:
            return b""
        if self.dot_ends and self._at_line_start and tail in (b".", b".\r"):
            self.done = True
            return b""
        return _crlf(tail.removesuffix(b"\r")) + CRLF


def _crlf(block: bytes) -> bytes:
    return block.replace(CRLF, b"\n").replace(b"\r", b"\n").replace(b"\n", CRLF)


class HeaderBlock:
    """Buffers CRLF input until the header block is complete, then splits it into fields."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.complete = False
        self.fields: list[bytes] = []
        self.rest = b""

    def feed(self, data: bytes) -> bool:
        if self.complete:
            raise RuntimeError("header already complete")
        self._buf += data
        if self._buf.startswith(CRLF):
            self._split(0, separator=True)
        elif (end := self._buf.find(b"\r\n\r\n")) >= 0:
            self._split(end + 2, separator=True)
        elif len(self._buf) > HEADER_LIMIT:
            self._split(self._buf.rfind(CRLF) + 2, separator=False)
        return self.complete

    def finish(self) -> None:
        if not self.complete:
            self._split(len(self._buf), separator=False)

    def _split(self, end: int, *, separator: bool) -> None:
        lines = bytes(self._buf[:end]).split(CRLF)[:-1]
        after = bytes(self._buf[end + 2 :] if separator else self._buf[end:])
        self._buf = bytearray()
        self.complete = True
        for n, line in enumerate(lines):
            if n == 0 and line.startswith(b"From "):
                continue  # mbox From_ line
            if _FIELD.match(line):
                self.fields.append(line + CRLF)
            elif line.startswith((b" ", b"\t")) and self.fields:
                self.fields[-1] += line + CRLF
            else:  # the body starts early; keep the separator it will get from render()
                self.rest = CRLF.join(lines[n:]) + CRLF + (CRLF if separator else b"") + after
                return
        self.rest = after

    @staticmethod
    def name(field: bytes) -> str:
        return field.split(b":", 1)[0].strip().decode("ascii").lower()

    def values(self, *names: str) -> list[str]:
        return [
            f.split(b":", 1)[1].replace(CRLF, b"").decode("utf-8", "replace")
            for f in self.fields
            if self.name(f) in names
        ]

    def has(self, name: str) -> bool:
        return any(self.name(f) == name for f in self.fields)

    def render(self, added: Iterable[str], strip: frozenset[str]) -> bytes:
        kept = [f for f in self.fields if self.name(f) not in strip]
        extra = [f"{a}\r\n".encode() for a in added]
        return b"".join(kept) + b"".join(extra) + CRLF + self.rest


# ---------------------------------------------------------------------------- identity & addresses


class Identity:
    """Who is submitting: the login from the real uid (not $USER), and a full name."""

    def __init__(self, full_name: str | None) -> None:
        import pwd

        self.uid = os.getuid()
        try:
            entry = pwd.getpwuid(self.uid)
            self.login, gecos = entry.pw_name, entry.pw_gecos.split(",")[0].strip()
        except KeyError:
            self.login, gecos = str(self.uid), ""
        #: -F; else $NAME or the passwd full name, used only when the From: is the login's
        self.explicit_name = full_name or ""
        self.full_name = full_name or os.environ.get("NAME") or gecos


def qualify(address: str, origin: str) -> str:
    return address if "@" in address or not address else f"{address}@{origin}"


def check_address(address: str) -> str:
    if len(address) > MAX_ADDRESS or any(
        ord(c) < 33 or ord(c) == 127 or c in "<>()," for c in address
    ):
        raise ValueError(address)
    return address


def parse_addresses(values: Iterable[str]) -> list[str]:
    """Addresses in `Name <addr>, addr2` lists; plain words skip the email package import."""
    values = list(values)
    if all(v and not any(c in v for c in ' \t,<>"();:\\') for v in values):
        return values
    from email.utils import getaddresses

    return [addr for _name, addr in getaddresses(values) if addr]


def rfc5322_date(now: float) -> str:
    lt = time.localtime(now)
    off = lt.tm_gmtoff or 0
    sign, off = ("-", -off) if off < 0 else ("+", off)
    return (
        f"{_DAYS[lt.tm_wday]}, {lt.tm_mday} {_MONTHS[lt.tm_mon - 1]} {lt.tm_year}"
        f" {lt.tm_hour:02d}:{lt.tm_min:02d}:{lt.tm_sec:02d} {sign}{off // 3600:02d}{off // 60 % 60:02d}"
    )


def from_field(address: str, name: str) -> str:
    if not name:
        return f"From: {address}"
    if not name.isascii():
        from email.header import Header

        name = Header(name, "utf-8").encode()
    elif not _ATOM_PHRASE.fullmatch(name):
        name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"From: {name} <{address}>"


# ---------------------------------------------------------------------------- one submission


class Submission:
    """One message on its way into the drop directory: feed CRLF data, then `finish()`."""

    def __init__(
        self,
        dirs: DropDirs,
        *,
        config: Config,
        identity: Identity,
        sender: str,
        recipients: list[dict[str, Any]],
        extract: bool,
        options: dict[str, Any],
        origin: str,
    ) -> None:
        self._dirs = dirs
        self._config = config
        self._identity = identity
        self._sender = sender
        self._recipients = recipients
        self._extract = extract
        self._options = options
        self._origin = origin
        self._head = HeaderBlock()
        self._writer: DropWriter | None = None
        self.error: SubmitError | None = None

    def feed(self, data: bytes) -> None:
        if self.error is not None or not data:
            return
        try:
            if self._writer is None:
                if self._head.feed(data):
                    self._open()
            else:
                self._write(data)
        except SubmitError as err:
            self.abort()
            self.error = err

    def finish(self) -> str:
        """Make the file durable and return its name (the maildrop id); SubmitError if not."""
        try:
            if self.error is None and self._writer is None:
                self._head.finish()
                self._open()
            if self.error is not None:
                raise self.error
            assert self._writer is not None
            try:
                return self._writer.commit()
            except OSError as err:
                raise SubmitError(EX_TEMPFAIL, f"cannot queue the message: {err}") from None
        finally:
            self.abort()

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def _open(self) -> None:
        head = self._head
        recipients = list(self._recipients)
        if self._extract:
            resent = any(HeaderBlock.name(f).startswith("resent-") for f in head.fields)
            names = ("to", "cc", "bcc")
            if resent:
                names = ("resent-to", "resent-cc", "resent-bcc")
            notify = self._options.get("notify", [])
            try:
                found = [check_address(qualify(a, self._origin))
                         for a in parse_addresses(head.values(*names))]
            except ValueError as err:
                raise SubmitError(EX_DATAERR, f"bad address in a header: {err}") from None
            recipients += [{"address": a, "notify": notify, "orcpt": None} for a in found]
        unique: dict[str, dict[str, Any]] = {}
        for r in recipients:
            unique.setdefault(r["address"], r)
        if not unique:
            raise SubmitError(EX_USAGE, "No recipient addresses found in message header")
        now = time.time()
        meta = {
            "sender": self._sender,
            "recipients": list(unique.values()),
            "body_type": self._options.get("body_type"),
            "dsn_ret": self._options.get("dsn_ret"),
            "dsn_envid": self._options.get("dsn_envid"),
            "smtputf8": bool(self._options.get("smtputf8")),
            "time": now,
            "origin": self._options.get("origin", "sendmail"),
        }
        try:
            self._dirs.create()
            self._writer = DropWriter(self._dirs, meta)
        except OSError as err:
            raise SubmitError(EX_TEMPFAIL, f"cannot write to {self._dirs.root}: {err}") from None
        added = []
        if not head.has("from"):
            me = self._identity
            login = qualify(me.login, self._origin)
            author = self._sender or login
            added.append(from_field(author, me.full_name if author == login else me.explicit_name))
        if not head.has("date"):
            added.append(f"Date: {rfc5322_date(now)}")
        if not head.has("message-id"):
            stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
            added.append(f"Message-ID: <{stamp}.{self._writer.name}@{self._config.hostname}>")
        self._write(head.render(added, frozenset({"bcc", "resent-bcc"})))

    def _write(self, data: bytes) -> None:
        assert self._writer is not None
        try:
            self._writer.write(data)
        except OSError as err:
            raise SubmitError(EX_TEMPFAIL, f"cannot write the message: {err}") from None
        if self._writer.size > self._config.limits.message_size:
            raise SubmitError(EX_DATAERR, "message file too big")


# ---------------------------------------------------------------------------- modes


def _reader(stream: BinaryIO) -> Callable[[int], bytes]:
    """read1 where there is one: return what has arrived instead of waiting for a full chunk."""
    if isinstance(stream, io.BufferedIOBase):
        return stream.read1
    return stream.read


class _LocalLineEnds:
    """Bare LF -> CRLF on the -bs input stream, chunk by chunk (a CRLF may be split across
    two reads: the LF after a chunk-final CR is already part of a CRLF)."""

    _BARE_LF = re.compile(rb"(?<!\r)\n")

    def __init__(self) -> None:
        self._after_cr = False

    def __call__(self, data: bytes) -> bytes:
        if not data:
            return data
        out = self._BARE_LF.sub(b"\r\n", data)
        if self._after_cr and data.startswith(b"\n"):
            out = out[1:]  # drop the CR added before it: its CR came in the previous chunk
        self._after_cr = data.endswith(b"\r")
        return out


def _origin(config: Config) -> str:
    return config.local_domains[0] if config.local_domains else config.hostname


def deliver(args: SendmailArgs, config: Config, stdin: BinaryIO, stderr: TextIO) -> int:
    origin = _origin(config)
    identity = Identity(args.full_name)
    notify = list(args.dsn_notify)
    try:
        argv_rcpts = [check_address(qualify(a, origin)) for a in parse_addresses(args.recipients)]
        sender = "" if args.sender == "" else check_address(
            qualify(args.sender or identity.login, origin)
        )
    except ValueError as err:
        print(f"sendmail: bad address: {err}", file=stderr)
        return EX_USAGE
    submission = Submission(
        DropDirs(config.state_path / "maildrop"),
        config=config,
        identity=identity,
        sender=sender,
        recipients=[{"address": a, "notify": notify, "orcpt": None} for a in argv_rcpts],
        extract=args.recipients_from_headers,
        options={"notify": notify, "body_type": args.body_type, "dsn_ret": args.dsn_ret,
                 "dsn_envid": args.dsn_envid},
        origin=origin,
    )
    read = _reader(stdin)
    normalizer = LineNormalizer(dot_ends=not args.ignore_dots)
    try:
        while not normalizer.done and submission.error is None:
            data = read(CHUNK)
            if not data:
                submission.feed(normalizer.finish())
                break
            submission.feed(normalizer.feed(data))
        name = submission.finish()
    except SubmitError as err:
        print(f"sendmail: {err}", file=stderr)
        return err.status
    finally:
        submission.abort()
    poke(config)
    del name
    return EX_OK


def poke(config: Config) -> None:
    """Tell a running daemon to collect the drop directory now; silent if that fails."""
    from mailhaven.control import channel as control

    with contextlib.suppress(control.ControlError, OSError):
        control.request(config.state_path / control.SOCKET_NAME, {"cmd": "pickup"}, timeout=2.0)


def flush(args: SendmailArgs, config: Config, stderr: TextIO) -> int:
    from mailhaven.control import channel as control

    req: dict[str, Any] = {"cmd": "flush"}
    if args.flush_site:
        req["domain"] = args.flush_site
    if args.flush_queue_id:
        req["ids"] = [args.flush_queue_id]
    try:
        answer = control.request(config.state_path / control.SOCKET_NAME, req)
    except control.ControlError as err:
        print(f"sendmail: cannot flush the queue: {err}", file=stderr)
        return EX_TEMPFAIL
    if answer is None:
        print("sendmail: mailhaven is not running; queued mail will be delivered when it starts",
              file=stderr)
        return EX_OK
    if not answer.get("ok"):
        print(f"sendmail: cannot flush the queue: {answer.get('error')}", file=stderr)
        return EX_UNAVAILABLE
    return EX_OK


def smtp_session(
    config: Config, stdin: BinaryIO, stdout: BinaryIO, stderr: TextIO | None = None
) -> int:
    """-bs: one SMTP session on stdin/stdout, driven through the sans-I/O server core."""
    from mailhaven.proto import replies as r
    from mailhaven.proto import smtp_server_events as ev
    from mailhaven.proto.smtp_server import NEED_DATA, ServerConnection, ServerSettings, State

    limits = config.limits
    conn = ServerConnection(
        ServerSettings(
            hostname=config.hostname,
            max_message_size=limits.message_size,
            max_recipients=limits.recipients,
            command_line_limit=limits.command_line,
            hard_error_limit=limits.hard_error_limit,
            forbid_unauth_pipelining=False,  # a local pipe, not a spam bot
        )
    )
    origin = _origin(config)
    identity = Identity(None)
    dirs = DropDirs(config.state_path / "maildrop")
    read = _reader(stdin)
    line_ends = _LocalLineEnds()
    submission: Submission | None = None
    queued = 0
    lost_in_data = False

    def start() -> Submission:
        mail = conn.mail
        assert mail is not None
        params = mail.params
        return Submission(
            dirs,
            config=config,
            identity=identity,
            sender=qualify(mail.address, origin),
            recipients=[
                {
                    "address": qualify(rcpt.address, origin),
                    "notify": list(rcpt.params.notify),
                    "orcpt": list(rcpt.params.orcpt) if rcpt.params.orcpt else None,
                }
                for rcpt in conn.recipients
            ],
            extract=False,
            options={
                "body_type": None if params.body == "7BIT" else params.body,
                "dsn_ret": params.ret,
                "dsn_envid": params.envid,
                "smtputf8": params.smtputf8,
                "origin": "sendmail -bs",
            },
            origin=origin,
        )

    conn.greet()
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            stdout.write(conn.data_to_send())
            stdout.flush()
            if conn.closed:
                break
            chunk = line_ends(read(CHUNK))
            lost_in_data = lost_in_data or (not chunk and conn.state is State.DATA)
            conn.receive_data(chunk)
            continue
        match event:
            case ev.Hello() | ev.MailFrom() | ev.RcptTo():
                conn.accept()
            case ev.BodyData(data=data):
                submission = submission or start()
                submission.feed(data)
            case ev.BodyEnd():
                submission = submission or start()
                try:
                    name = submission.finish()
                except SubmitError as err:
                    conn.respond(_smtp_refusal(err))
                else:
                    queued += 1
                    conn.respond(r.queued_as(name))
                submission = None
            case ev.BodyAborted() | ev.Reset():
                if submission is not None:
                    submission.abort()
                submission = None
            case ev.Verify():
                conn.respond(r.CANNOT_VRFY)
            case ev.Expand() | ev.Etrn():
                conn.respond(r.NOT_IMPLEMENTED)
            case ev.AuthStart() | ev.AuthResponse():  # never offered
                conn.auth_finish(r.AUTH_NOT_ENABLED, None)
            case ev.StartTLS() | ev.Closed():
                pass
        stdout.write(conn.data_to_send())
        stdout.flush()
        if conn.closed and not conn.awaiting_decision and isinstance(event, ev.Closed):
            break
    if submission is not None:
        submission.abort()
    if queued:
        poke(config)
    if lost_in_data:
        print("sendmail: -bs: input ended inside DATA (no final \".\" line):"
              " that message was not queued", file=stderr or sys.stderr)
        return EX_DATAERR
    return EX_OK


def _smtp_refusal(err: SubmitError) -> Reply:
    from mailhaven.proto.replies import Reply

    match err.status:
        case 65:
            return Reply(552, f"Error: {err}", "5.3.4")
        case 64:
            return Reply(554, f"Error: {err}", "5.5.1")
        case _:
            return Reply(451, f"Error: {err}", "4.3.0")


def load_config(args: SendmailArgs) -> Config:
    """-C file (or a directory holding mailhaven.toml), else what every command reads
    (`config.locate`: $MAILHAVEN_CONFIG, /etc/mailhaven/mailhaven.toml, built-in defaults)."""
    from mailhaven import config as configuration

    return configuration.load(configuration.locate(args.config_dir))


USAGE = """\
usage: sendmail [options] [recipient ...]       (mailhaven's sendmail-compatible entry)

  -t            take recipients from To:, Cc: and Bcc: (Bcc: is removed)
  -i, -oi       a line holding only a dot does not end the message
  -f SENDER     envelope sender (-F NAME: full name for a From: header we add)
  -bs           speak SMTP on standard input and output
  -bp           list the queue (as mailq);  -q: flush the queue;  -qR DOMAIN, -qS DOMAIN
  -bi           newaliases (aliases live in the configuration file)
  -N NOTIFY     DSN notify (never, or success,delay,failure);  -R full|hdrs;  -V ENVID
  -C FILE       configuration file or directory (else $MAILHAVEN_CONFIG,
                /etc/mailhaven/mailhaven.toml, built-in defaults)

Exit codes (sysexits.h): 0 queued, 64 usage, 65 bad data, 75 try again later, 78 configuration.
"""


def sendmail_main(
    argv: list[str],
    prog: str = "sendmail",
    *,
    stdin: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """The whole command; `argv` without the program name, `prog` is argv[0] (sets the mode)."""
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
    stderr = stderr or sys.stderr
    if argv in (["--help"], ["-?"]):
        stdout.write(USAGE.encode())
        stdout.flush()
        return EX_OK
    try:
        args = parse_sendmail_args(argv, prog)
    except UsageError as err:
        print(f"sendmail: {err}", file=stderr)
        return EX_USAGE
    for warning in args.warnings:
        print(f"sendmail: warning: {warning}", file=stderr)
    from mailhaven.config import ConfigError, require_state

    try:
        config = load_config(args)
    except ConfigError as err:
        print(f"sendmail: {err}", file=stderr)
        return EX_CONFIG
    if args.mode not in ("newaliases", "verify", "daemon", "ignore"):
        try:
            require_state(config)
        except ConfigError as err:  # the mail would wait where no daemon ever looks
            print(f"sendmail: {err}", file=stderr)
            return EX_TEMPFAIL
    match args.mode:
        case "deliver":
            return deliver(args, config, stdin, stderr)
        case "smtp":
            return smtp_session(config, stdin, stdout, stderr)
        case "mailq":
            from mailhaven.cli.queue import maildrop_entries, print_mailq, warn_if_down

            warn_if_down(config, prog, stderr)
            text = io.TextIOWrapper(stdout, encoding="utf-8", errors="replace", write_through=True)
            try:
                return print_mailq(config.spool_path, text, maildrop_entries(config.state_path))
            finally:
                text.detach()
        case "flush":
            return flush(args, config, stderr)
        case "newaliases":
            print("sendmail: aliases live in the configuration file; nothing to rebuild",
                  file=stderr)
            return EX_OK
        case "verify" | "daemon":
            what = "-bv" if args.mode == "verify" else "-bd (use `mailhaven serve`)"
            print(f"sendmail: {what} is not supported", file=stderr)
            return EX_UNAVAILABLE
        case "ignore":
            return EX_OK


def main() -> int:
    """Entry point for `python -m mailhaven.cli.sendmail` and a `sendmail`/`mailq` symlink."""
    return sendmail_main(sys.argv[1:], Path(sys.argv[0]).name)


if __name__ == "__main__":
    sys.exit(main())
