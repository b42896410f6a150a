"""Disk space for the spool: refusing mail before it runs out, and a reserve for when it did.

- `free_bytes`: what an unprivileged writer may still use on the spool's file system.
- `is_storage_full`: whether an error means "no space" (ENOSPC/EDQUOT from a file, SQLITE_FULL
  from the database), so callers answer `452 4.3.1` (RFC 3463: mail system full) with one log
  line instead of a 451 and a traceback.
- `Reserve`: a file of `RESERVE_BYTES` zeros kept in the spool (Postfix keeps
  `queue_minfree` free instead; a file of our own also covers space other programs take). When
  a write that must not be lost — a delivery's result, above all "delivered" — finds the disk
  full, the reserve is released and the write retried, so a message already handed over is
  never delivered twice for want of a few WAL pages. It is made again when space returns.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
from pathlib import Path

from mailhaven.proto.replies import STORAGE_FULL, Reply

log = logging.getLogger("mailhaven.spool")

#: bytes set aside for recording delivery results on a full disk (a WAL frame is a page
#: plus 24 bytes; this covers thousands of result updates and a checkpoint)
RESERVE_BYTES = 1024 * 1024
#: SQLite's result code for "database or disk is full"
SQLITE_FULL = 13
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def free_bytes(path: Path) -> int:
    """Bytes available to non-root writers on the file system holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def storage_refusal(path: Path, minfree: int, size: int = 0) -> Reply | None:
    """`STORAGE_FULL` when fewer than `minfree` bytes would be left after a message of `size`
    bytes (Postfix smtpd with `queue_minfree`); None when there is room."""
    try:
        free = free_bytes(path)
    except OSError:
        return None  # cannot tell: the commit will say
    return STORAGE_FULL if free - size < minfree else None


def is_storage_full(exc: BaseException | None) -> bool:
    """True if `exc` (or an exception it was raised from) means the disk is full."""
    seen = 0
    while exc is not None and seen < 8:  # bounded walk of the cause chain
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        if isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


class Reserve:
    """The spool's reserve file (see the module docstring)."""

    def __init__(self, path: Path, size: int = RESERVE_BYTES) -> None:
        self.path = path
        self.size = size

    @property
    def held(self) -> bool:
        try:
            return self.path.stat().st_size >= self.size
        except OSError:
            return False

    def ensure(self) -> bool:
        """(Re)create the reserve if there is room; False if it could not be made now."""
        if self.held:
            return True
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)  # real blocks, not a sparse file
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.path.unlink(missing_ok=True)
            if exc.errno not in _FULL_ERRNOS:
                log.warning("spool: cannot create reserve %s: %s", self.path, exc)
            return False
        return True

    def release(self) -> bool:
        """Give the reserve's space back to the file system; False if there was none."""
        if not self.path.exists():
            return False
        self.path.unlink(missing_ok=True)
        log.warning("spool: disk full; released the %d-byte reserve to record results", self.size)
        return True
