"""Crash injection for the durability tests: `crash_point(name)` marks a step after which a
crash must not lose acknowledged mail (the table of points is in docs/durability.md).

Off (always, in production): `crash_point` is a function that returns at once. On: the
environment variable `MAILHAVEN_CRASH_AT=name[:count]` was set when this module was imported;
the `count`-th time (default 1) the named point is reached after `arm()`, the process writes
one line to stderr and sends itself SIGKILL, so no `finally`, atexit or shutdown code runs,
exactly like `kill -9` or the OOM killer. The variable is read once, here, never per call.

`arm()` is called by the daemon once it is ready: start-up's own commits (recovery) do not
count, so "the first COMMIT" in a test means the first one caused by the test's traffic.

Only tests set the variable; nothing in the configuration file can.
"""

from __future__ import annotations

import os
import signal
import threading

#: the environment variable naming the point (and which hit of it) to crash at
ENV = "MAILHAVEN_CRASH_AT"

#: every named point; a name not listed here is refused, so a typo cannot silently test nothing
POINTS = frozenset(
    {
        # spool (intake): a body above the inline limit, then the queue row
        "body_written",  # spilled body written to tmp/, not fsync'd
        "body_synced",  # body fsync'd in tmp/, not yet renamed into bodies/
        "body_linked",  # body in bodies/ and the directory fsync'd, row not committed
        "before_commit",  # a transaction's statements ran, COMMIT not made
        "after_commit",  # COMMIT returned, nobody told yet
        # SMTP server
        "before_250",  # intake queued the message, the 250 not yet written to the client
        # local delivery (Maildir)
        "maildir_tmp_written",  # copy fsync'd in tmp/, not yet renamed into new/
        "maildir_linked",  # renamed into new/ (the name is older), new/ not yet fsync'd
        # scheduler
        "delivered",  # an agent returned its replies (e.g. 250), nothing recorded yet
        # bounces
        "bounce_built",  # the report is built, not yet queued
        "bounce_queued",  # the report is queued, the original not yet removed
        # pickup of sendmail's drop files
        "pickup_read",  # drop file read into a spool writer, not yet queued
        "pickup_queued",  # queued, the drop file not yet deleted
    }
)


def _parse(value: str) -> tuple[str, int] | None:
    if not value:
        return None
    name, _, count = value.partition(":")
    if name not in POINTS or not (count or "1").isdigit() or int(count or "1") < 1:
        raise ValueError(f"{ENV}={value!r}: expected one of {sorted(POINTS)}, optionally :N")
    return name, int(count or "1")


_TARGET = _parse(os.environ.get(ENV, ""))
_armed = False
_hits = 0
_lock = threading.Lock()


def arm() -> None:
    """Start counting hits (the daemon calls this once it is serving)."""
    global _armed
    _armed = True


def _crash_if_due(name: str) -> None:
    global _hits
    assert _TARGET is not None
    if not _armed or name != _TARGET[0]:
        return
    with _lock:
        _hits += 1
        due = _hits == _TARGET[1]
    if due:
        os.write(2, f"mailhaven: crash injected at {name} (pid {os.getpid()})\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)


def _nothing(name: str) -> None:
    return None


#: the hook production code calls; a no-op unless `MAILHAVEN_CRASH_AT` was set
crash_point = _nothing if _TARGET is None else _crash_if_due
