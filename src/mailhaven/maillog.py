"""Logging in Postfix's maillog shape, so `grep QUEUEID` tells a message's story and pflogsumm
can summarise our logs (`pflogsumm --syslog-name=mailhaven`).

Each line: `Mon DD HH:MM:SS host mailhaven/<role>[pid]: <text>`. The role comes from the logger
name: `mailhaven.smtpd` -> `mailhaven/smtpd`. Roles whose lines pflogsumm reads are named like
Postfix's daemons: smtpd (connects, rejects), cleanup (message-id), qmgr (from=, removed),
local / smtp (delivery status lines), bounce.

Cost: a relayed message logs about seven lines. Written one `write` each, they cost the relay
benchmark ~0.4 ms of CPU per message (an extra system call per line, each a chance for the
spool's writer thread to take the GIL), a third of all its work. So `BatchingHandler` gathers
the lines logged during one turn of the event loop and writes them at the start of the next
turn, in one call; warnings, errors and lines from other threads are written at once. A line is
therefore on disk within the same loop turn-around (sub-millisecond), and lost only by a crash
in that window. `setup` also turns off the record fields nobody prints (caller, thread and
process names: the logging HOWTO's "Optimization" knobs).
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


class MaillogFormatter(logging.Formatter):
    """Syslog-shaped lines on stderr; tracebacks follow on their own lines."""

    def __init__(self, hostname: str) -> None:
        super().__init__()
        self.hostname = hostname.split(".")[0] or "localhost"
        self.pid = os.getpid()
        #: (second, its formatted stamp), replaced whole so threads never see half an update
        self._stamp: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        parts = record.name.split(".")
        role = parts[1] if len(parts) > 1 else "master"
        role = _ROLE_ALIASES.get(role, role)
        second = int(record.created)
        cached, stamp = self._stamp
        if second != cached:  # formatted once per second, not once per line
            stamp = time.strftime("%b %e %H:%M:%S", time.localtime(second))
            self._stamp = (second, stamp)
        level = ""
        if record.levelno >= logging.ERROR:
            level = "error: "
        elif record.levelno >= logging.WARNING:
            level = "warning: "
        line = f"{stamp} {self.hostname} mailhaven/{role}[{self.pid}]: {level}{record.getMessage()}"
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
        loop = _loop_of_this_thread() if record.levelno < logging.WARNING else None
        if loop is None:
            self._write([line])
            return
        self._pending.append(line)
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


def _loop_of_this_thread() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def setup(hostname: str, level: str = "info", stream: TextIO | None = None) -> None:
    """Route the `mailhaven` loggers to `stream` (stderr by default) in maillog shape."""
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no caller lookup per record (the HOWTO's documented knob)
    handler = BatchingHandler(stream or sys.stderr)
    handler.setFormatter(MaillogFormatter(hostname))
    root = logging.getLogger("mailhaven")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False


def client_label(address: str, name: str = "") -> str:
    """Postfix's `name[address]`; we do no reverse DNS unless asked, so name is `unknown`."""
    return f"{name or 'unknown'}[{address}]"
