"""Logging in Postfix's maillog shape, so `grep QUEUEID` tells a message's story and pflogsumm
can summarise our logs (`pflogsumm --syslog-name=mailhaven`).

Each line: `Mon DD HH:MM:SS host mailhaven/<role>[pid]: <text>`. The role comes from the logger
name: `mailhaven.smtpd` -> `mailhaven/smtpd`. Roles whose lines pflogsumm reads are named like
Postfix's daemons: smtpd (connects, rejects), cleanup (message-id), qmgr (from=, removed),
local / smtp (delivery status lines), bounce.

Cost: a relayed message logs about seven lines. Written one `write` each, they were a large
share of the relay's CPU (a system call per line, each a chance for the spool's writer thread
to take the GIL; docs/benchmarks.md, "Design measurements"). So `BatchingHandler` gathers
the lines logged during one turn of the event loop and writes them at the start of the next
turn, in one call; warnings, errors and lines from other threads are written at once. A line is
therefore on disk within the same loop turn-around (sub-millisecond), and lost only by a crash
in that window. `setup` also turns off the record fields nobody prints (caller, thread and
process names: the logging HOWTO's "Optimization" knobs).

`info(logger, msg, *args)` is the hot path's way to log (the lines of every message): when the
line can only reach our handler (the usual case once `setup` ran: no other handler, filter or
level in the way), it formats the line itself instead of building a `LogRecord` and walking
logging's handler chain (measured with `bench/micro.py`). Otherwise it is exactly
`logger.info(msg, *args)`. A function the hot call sites opt into, not a faster `Logger`
class, because `logging.setLoggerClass` would change every library's loggers in the process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import TextIO

#: Logger name -> Postfix-like program name.
_ROLE_ALIASES = {
    "queue": "qmgr",
    "intake": "cleanup",
    "delivery": "qmgr",
    "spool": "qmgr",
    "scheduler": "qmgr",
}


def _escaped(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape(text: str) -> str:
    """`text` with every non-printable character (CR, LF, other controls, line separators)
    written as a backslash escape: client strings reach log lines (HELO names, addresses, AUTH
    names, remote replies), and a line break in one would forge a log line of its own."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escaped(c) for c in text)


class MaillogFormatter(logging.Formatter):
    """Syslog-shaped lines on stderr; tracebacks follow on their own lines."""

    def __init__(self, hostname: str) -> None:
        super().__init__()
        self.hostname = hostname.split(".")[0] or "localhost"
        self.pid = os.getpid()
        #: (second, its formatted stamp), replaced whole so threads never see half an update
        self._stamp: tuple[int, str] = (-1, "")
        #: logger name -> " host mailhaven/role[pid]: "
        self._prefixes: dict[str, str] = {}

    def stamp(self, created: float) -> str:
        """`Mon DD HH:MM:SS` of a time, formatted once per second, not once per line."""
        second = int(created)
        cached, stamp = self._stamp
        if second != cached:
            stamp = time.strftime("%b %e %H:%M:%S", time.localtime(second))
            self._stamp = (second, stamp)
        return stamp

    def prefix(self, name: str) -> str:
        """What follows the stamp for lines of logger `name`, up to the text."""
        prefix = self._prefixes.get(name)
        if prefix is None:
            parts = name.split(".")
            role = parts[1] if len(parts) > 1 else "master"
            role = _ROLE_ALIASES.get(role, role)
            prefix = self._prefixes[name] = f" {self.hostname} mailhaven/{role}[{self.pid}]: "
        return prefix

    def info_line(self, name: str, text: str) -> str:
        """An info line of logger `name` with `text` (escaped already): the fast path's."""
        return self.stamp(time.time()) + self.prefix(name) + text

    def format(self, record: logging.LogRecord) -> str:
        level = ""
        if record.levelno >= logging.ERROR:
            level = "error: "
        elif record.levelno >= logging.WARNING:
            level = "warning: "
        text = escape(record.getMessage())  # one place for every line: see `escape`
        line = self.stamp(record.created) + self.prefix(record.name) + level + text
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class BatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A `StreamHandler` that writes the info lines of one event-loop turn together."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        if record.levelno < logging.WARNING:
            self.add_info(line)
        else:
            self._write([line])

    def add_info(self, line: str) -> None:
        """An info line (with its line end): pending until the loop's next turn when logged
        on an event loop's thread, else written at once."""
        loop = asyncio.events._get_running_loop()
        if loop is None:
            self._write([line])
            return
        self.acquire()  # `info` comes here without logging's lock; another thread may write
        try:
            self._pending.append(line)
        finally:
            self.release()
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        if self._pending:
            self._write([])

    def _write(self, lines: list[str]) -> None:
        """Write what is pending (in order), then `lines`, in one call, and flush."""
        self.acquire()
        try:
            pending, self._pending = self._pending, []
            self.stream.write("".join(pending + lines))
            self.stream.flush()
        except Exception:
            self._pending = []
        finally:
            self.release()

    def flush(self) -> None:
        if self._pending:
            self._write([])
        else:
            super().flush()


#: the handler `setup` installed on the `mailhaven` logger (None: not set up)
_handler: BatchingHandler | None = None
_root = logging.getLogger("mailhaven")


def info(logger: logging.Logger, msg: str, *args: object) -> None:
    """`logger.info(msg, *args)` for the hot path (see the module docstring).

    The fast path is taken only when nothing but our handler could see the line: `logger` is a
    direct child of `mailhaven` without handlers or filters of its own, `mailhaven` has just
    our handler and no filters, and info is enabled for `logger` (which honours
    `logging.disable` and every level set on the way)."""
    handler = _handler
    if (
        handler is None
        or logger.parent is not _root
        or logger.handlers
        or logger.filters
        or not logger.propagate
        or logger.disabled
        or len(_root.handlers) != 1
        or _root.handlers[0] is not handler
        or _root.filters
        or handler.filters
        or handler.level > logging.INFO
        or not logger.isEnabledFor(logging.INFO)
    ):
        logger.info(msg, *args)
        return
    formatter = handler.formatter
    assert isinstance(formatter, MaillogFormatter)
    try:
        text = escape(msg % args if args else msg)
    except Exception:  # let logging report the bad call as it always does
        logger.info(msg, *args)
        return
    handler.add_info(formatter.info_line(logger.name, text) + handler.terminator)


def setup(
    hostname: str,
    level: str = "info",
    stream: TextIO | None = None,
    *,
    formatter: MaillogFormatter | None = None,
) -> None:
    """Route the `mailhaven` loggers in maillog shape to `stream` (stderr when None).

    `runtime.logtargets.setup` picks the stream and formatter from the `log` and `log_format`
    settings; this module stays a leaf that every layer may import."""
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no caller lookup per record (the HOWTO's documented knob)
    global _handler
    handler = BatchingHandler(stream or sys.stderr)
    handler.setFormatter(formatter or MaillogFormatter(hostname))
    root = _root
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    _handler = handler


def flush() -> None:
    """Write what is pending now (before exit, or where a test reads the target)."""
    if _handler is not None:
        _handler.flush()


def reopen() -> None:
    """Reopen a file target at its path (SIGUSR1, after logrotate renamed the file)."""
    flush()
    reopen_stream = getattr(_handler.stream, "reopen", None) if _handler is not None else None
    if reopen_stream is not None:
        reopen_stream()


def client_label(address: str, name: str = "") -> str:
    """Postfix's `name[address]`; the name is `unknown` unless `reverse_lookup` verified one."""
    return f"{name or 'unknown'}[{address}]"
