"""Where the maillog goes: stderr, a file (reopened for logrotate), syslog, and JSON lines.

In: the `log` setting (`"stderr"`, `"file:PATH"`, `"syslog"` or `"syslog:SOCKET"`) and
`log_format` (`"text"`, `"json"`). Out: the stream `maillog.BatchingHandler` writes to and the
formatter that shapes each line. The text shape is Postfix's, so pflogsumm and fail2ban's postfix
filters read our files as they read Postfix's; syslog gets the same text behind an RFC 3164
`<PRI>` (facility mail), which rsyslog/journald file under `mail.*` like Postfix's lines.

Invariants: every target gets whole lines (a datagram per line for syslog); a lost syslog socket
or a failed write never raises into the server (lines are dropped, as syslog(3) drops them);
`reopen()` on a file target closes and reopens the same path, so after logrotate renames the
file, the next line goes to a fresh one and none is lost in between (each batch is one write).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import sys
import threading
import time
from typing import TextIO, cast

from mailhaven import maillog
from mailhaven.maillog import MaillogFormatter

#: RFC 3164/5424: facility mail (2) times 8 plus the severity.
_MAIL = 2 * 8
_SEVERITY = {logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}
#: Where syslog(3) sends on Linux.
DEV_LOG = "/dev/log"
#: A queue id at the start of a line (spool.ids: 15 Crockford base-32 characters).
_QUEUE_ID = re.compile(r"([0-9A-HJKMNP-TV-Z]{15}): ")


class TargetError(ValueError):
    """A `log` setting that names no target we have."""


def parse(target: str) -> tuple[str, str]:
    """`("stderr", "")`, `("file", PATH)` or `("syslog", SOCKET)`; TargetError otherwise."""
    kind, _, where = target.partition(":")
    if kind == "stderr" and not where:
        return kind, ""
    if kind == "file" and os.path.isabs(where):
        return kind, where
    if kind == "syslog" and (not where or os.path.isabs(where)):
        return kind, where or DEV_LOG
    raise TargetError(
        f'log: "stderr", "syslog", "syslog:/path/to/socket" or "file:/absolute/path", '
        f"not {target!r}"
    )


def _severity(levelno: int) -> int:
    return next((sev for level, sev in _SEVERITY.items() if levelno >= level), 7)


class SyslogFormatter(MaillogFormatter):
    """`<PRI>Mon DD HH:MM:SS mailhaven/role[pid]: text`: no host name, syslogd adds its own."""

    def prefix(self, name: str) -> str:
        return super().prefix(name).replace(f" {self.hostname} ", " ", 1)

    def format(self, record: logging.LogRecord) -> str:
        head = f"<{_MAIL + _severity(record.levelno)}>"
        lines = super().format(record).split("\n")
        # a traceback's lines each get the header, so each datagram is a whole syslog line
        first, rest = lines[0], lines[1:]
        stamp_prefix = first[: len(first) - len(first.partition("]: ")[2])]
        return "\n".join([head + first] + [head + stamp_prefix + line for line in rest])

    def info_line(self, name: str, text: str) -> str:
        return f"<{_MAIL + 6}>" + super().info_line(name, text)


class JsonFormatter(MaillogFormatter):
    """One JSON object per line, for log shippers: the same facts as the text line, as fields."""

    def format(self, record: logging.LogRecord) -> str:
        level = logging.getLevelName(record.levelno).lower()
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return self._line(record.created, record.name, level, text)

    def info_line(self, name: str, text: str) -> str:
        return self._line(time.time(), name, "info", text)

    def _line(self, created: float, name: str, level: str, text: str) -> str:
        program = self.prefix(name).strip().split(" ", 1)[1].rstrip(":")  # mailhaven/role[pid]
        fields: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
            + f".{int(created % 1 * 1000):03d}Z",
            "host": self.hostname,
            "program": program.partition("[")[0],
            "pid": self.pid,
            "level": level,
        }
        if match := _QUEUE_ID.match(text):
            fields["queue_id"] = match.group(1)
        fields["text"] = text
        return json.dumps(fields, ensure_ascii=False)


#: seconds one line may wait for room in a full syslog socket before it is dropped: a syslogd
#: that stops reading must not stop the mail server with it
SYSLOG_SEND_TIMEOUT = 1.0


class DatagramStream:
    """A text stream that sends each line as one datagram to a syslog socket."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            for line in text.split("\n"):
                if line:
                    self._send(line.encode("utf-8", "backslashreplace"))
        return len(text)

    def _send(self, data: bytes) -> None:
        for _ in range(2):  # one reconnect: syslogd may have restarted
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._sock.settimeout(SYSLOG_SEND_TIMEOUT)
                    self._sock.connect(self.path)
                self._sock.send(data)
                return
            except TimeoutError:
                return  # syslogd is not reading: drop the line, as syslog(3) would
            except OSError:
                self.close()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


class ReopenableFile:
    """An append-only text file that `reopen()` closes and opens again at the same path."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file = self._open()

    def _open(self) -> TextIO:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return open(fd, "a", encoding="utf-8", errors="backslashreplace")

    def write(self, text: str) -> int:
        with self._lock:
            return self._file.write(text)

    def flush(self) -> None:
        with self._lock:
            self._file.flush()

    def reopen(self) -> None:
        with self._lock:
            new = self._open()  # before closing the old one: a failure keeps logging going
            old, self._file = self._file, new
            with contextlib.suppress(OSError):
                old.close()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def open_target(target: str, log_format: str, hostname: str) -> tuple[object, MaillogFormatter]:
    """The stream and formatter for a `log` / `log_format` pair (see the module docstring)."""
    kind, where = parse(target)
    stream: object
    formatter: MaillogFormatter
    match kind:
        case "file":
            stream = ReopenableFile(where)
        case "syslog":
            stream = DatagramStream(where)
        case _:
            stream = sys.stderr
    if log_format == "json":
        formatter = JsonFormatter(hostname)
    elif kind == "syslog":
        formatter = SyslogFormatter(hostname)
    else:
        formatter = MaillogFormatter(hostname)
    return stream, formatter


def setup(
    hostname: str, level: str = "info", *, target: str = "stderr", log_format: str = "text"
) -> None:
    """Route the maillog to the `log` setting's target in its `log_format`."""
    stream, formatter = open_target(target, log_format, hostname)
    maillog.setup(hostname, level, cast(TextIO, stream), formatter=formatter)
