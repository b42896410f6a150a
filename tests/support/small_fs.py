"""A small tmpfs for disk-full tests (we run as root; skipped where mounting is not allowed).

    with small_tmpfs(tmp_path / "fs", size=8 * 1024 * 1024) as root:
        ...                                   # root is an empty, mounted, 8 MiB file system
        fill(root / "filler")                 # takes every free byte; unlink it to free them

Unmounted on exit (lazily if a file is still open), so a failed test leaves no mount behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

#: bytes written per step while filling (small, so the file system ends up full to the block)
_FILL_STEP = 64 * 1024


@contextlib.contextmanager
def small_tmpfs(path: Path, *, size: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the disk-full test: {done.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path, *, leave: int = 0) -> int:
    """Write `path` until its file system is full (or only about `leave` bytes are free);
    returns the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        while True:
            st = os.statvfs(path.parent)
            room = st.f_bavail * st.f_frsize - leave
            if room <= 0:
                break
            try:
                written += f.write(b"\0" * min(_FILL_STEP, room))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    return written
