"""The daemon lock: one writer of the queue at a time.

`DaemonLock` is an exclusive `flock` on `<state_dir>/spool/queue.lock`. The daemon holds it for
its lifetime; the CLI takes it (without waiting) before it opens the spool itself, so the two
never run recovery or write the queue behind each other's back. The kernel drops the lock when
the holder dies, so a crash never leaves the queue locked.
"""

from __future__ import annotations

import os
from pathlib import Path


class DaemonLock:
    """An exclusive `flock` that says "the queue is in use" (daemon, or a CLI working offline)."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, path: Path, *, wait: bool = False) -> DaemonLock | None:
        """Take the lock; None when someone else holds it and `wait` is False."""
        import fcntl

        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> DaemonLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_path(spool_path: Path) -> Path:
    return spool_path / "queue.lock"


def lock_queue(spool_path: Path) -> DaemonLock:
    """The lock of the spool at `spool_path` for a process that serves it; OSError (which the
    command line reports) when another process holds it."""
    lock = DaemonLock.acquire(lock_path(spool_path))
    if lock is None:
        raise OSError(f"{spool_path}: the queue is in use (another mailhaven?)")
    return lock
