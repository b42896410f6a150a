"""Logging in Postfix's maillog shape, so `grep QUEUEID` tells a message's story and pflogsumm
can summarise our logs (`pflogsumm --syslog-name=mailhaven`).

Each line: `Mon DD HH:MM:SS host mailhaven/<role>[pid]: <text>`. The role comes from the logger
name: `mailhaven.smtpd` -> `mailhaven/smtpd`. Roles whose lines pflogsumm reads are named like
Postfix's daemons: smtpd (connects, rejects), cleanup (message-id), qmgr (from=, removed),
local / smtp (delivery status lines), bounce.
"""

from __future__ import annotations

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

    def format(self, record: logging.LogRecord) -> str:
        parts = record.name.split(".")
        role = parts[1] if len(parts) > 1 else "master"
        role = _ROLE_ALIASES.get(role, role)
        stamp = time.strftime("%b %e %H:%M:%S", time.localtime(record.created))
        level = ""
        if record.levelno >= logging.ERROR:
            level = "error: "
        elif record.levelno >= logging.WARNING:
            level = "warning: "
        line = f"{stamp} {self.hostname} mailhaven/{role}[{self.pid}]: {level}{record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(hostname: str, level: str = "info", stream: TextIO | None = None) -> None:
    """Route the `mailhaven` loggers to `stream` (stderr by default) in maillog shape."""
    handler = logging.StreamHandler(stream or sys.stderr)
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
