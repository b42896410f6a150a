"""The drop directory: how `mailhaven sendmail` hands a message to the daemon (Postfix's maildrop).

Layout under `<state_dir>/maildrop/`: `tmp/` (files being written), `new/` (complete files,
waiting for pickup), `corrupt/` (files the pickup refused, kept for the administrator).

One message is one file. The writer (`DropWriter`, run by `sendmail` in the caller's process)
creates `tmp/<name>`, writes it, fsyncs it, renames it into `new/` and fsyncs `new/`; only then
does `sendmail` exit 0. A file in `new/` is therefore complete, and a crash leaves at most a
stale file in `tmp/` (the pickup removes those after `STALE_TMP_AGE`). Names are
`<microseconds, hex>.<pid>.<random hex>`; the name is the "maildrop id" sendmail reports.

File format (version 1), chosen so the reader can verify it without trusting it:

    line 1  b"MHDROP1 " + the body size as 20 decimal digits + b"\\n"   (fixed: 29 bytes)
    line 2  one JSON object, UTF-8, no newline inside, then b"\\n"     (at most MAX_META bytes)
    rest    exactly <body size> bytes: the message, header and body, CRLF line endings

Line 1 is written with a zero size and patched after the body, so a truncated file shows. The
JSON object (`meta`) holds: `sender` (str, "" is the null sender), `recipients` (list of
{`address`, `notify` (list of str), `orcpt` ([type, address] or null)}), `body_type`
("7BIT", "8BITMIME" or null: not declared, the pickup looks at the bytes), `dsn_ret`,
`dsn_envid` (str or null), `smtputf8` (bool), `time` (float, when written), `origin`
("sendmail" or "sendmail -bs").

Why CRLF: messages arriving over SMTP are stored as sent, with CRLF; storing locally submitted
mail the same way keeps the queue uniform (delivery agents and DSNs see one line convention).

This module imports only the standard library's cheapest modules: `sendmail` must start fast.

SECURITY: the file's content comes from an unprivileged local user. The reader (`open_drop`)
opens without following symlinks, accepts only a regular file with one link (so a user cannot
plant a link to a file they may not read), bounds the JSON line, and checks the sizes. It
returns the meta object untrusted: the pickup validates each field before building an envelope,
and takes the submitting uid from the file's owner, never from the content.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

MAGIC = b"MHDROP1 "
SIZE_DIGITS = 20
FIRST_LINE_LENGTH = len(MAGIC) + SIZE_DIGITS + 1
#: The JSON line is bounded (1000 recipients of 254 octets each with DSN options fit easily).
MAX_META = 1024 * 1024
#: Files left in tmp/ longer than this were abandoned by a crashed or killed sendmail.
STALE_TMP_AGE = 24 * 3600.0
#: Names `DropWriter` makes; anything else in new/ is not ours.
NAME_PATTERN = re.compile(r"[0-9a-f]{1,16}\.[0-9]{1,10}\.[0-9a-f]{8}")
FORMAT_VERSION = 1


class CorruptDrop(ValueError):
    """A file in `new/` that is not a well-formed drop file; the message says why."""


@dataclass(frozen=True, slots=True)
class DropDirs:
    """The drop directory's paths."""

    root: Path

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def new(self) -> Path:
        return self.root / "new"

    @property
    def corrupt(self) -> Path:
        return self.root / "corrupt"

    def create(self, mode: int = 0o700) -> None:
        """Make the directories if missing (existing ones keep their mode: see docs)."""
        for path in (self.root, self.tmp, self.new, self.corrupt):
            path.mkdir(mode=mode, parents=True, exist_ok=True)


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_name(now: float | None = None) -> str:
    micros = int((time.time() if now is None else now) * 1_000_000)
    return f"{micros:x}.{os.getpid()}.{os.urandom(4).hex()}"


class DropWriter:
    """One message being written into the drop directory. `commit()` or `abort()` it.

    Raises OSError when the directory cannot be written (sendmail then exits EX_TEMPFAIL).
    """

    def __init__(self, dirs: DropDirs, meta: dict[str, Any]) -> None:
        self.dirs = dirs
        self.name = new_name()
        self._tmp = dirs.tmp / self.name
        line = json.dumps(meta, separators=(",", ":"), ensure_ascii=True).encode("ascii")
        if len(line) > MAX_META:
            raise ValueError("too many recipients for one message")
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        self._file: BinaryIO | None = open(fd, "wb", buffering=64 * 1024)  # noqa: SIM115
        self._file.write(MAGIC + b"0" * SIZE_DIGITS + b"\n" + line + b"\n")
        self.size = 0

    def write(self, data: bytes) -> None:
        assert self._file is not None, "write after commit or abort"
        self._file.write(data)
        self.size += len(data)

    def commit(self) -> str:
        """Patch the size, fsync, rename into new/, fsync new/: durable. Returns the name."""
        f = self._file
        assert f is not None, "commit after commit or abort"
        f.flush()
        f.seek(len(MAGIC))
        f.write(b"%0*d" % (SIZE_DIGITS, self.size))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self._file = None
        os.rename(self._tmp, self.dirs.new / self.name)
        fsync_directory(self.dirs.new)
        return self.name

    def abort(self) -> None:
        """Discard: nothing of this message reaches new/. Idempotent."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self._tmp.unlink(missing_ok=True)


@dataclass(frozen=True, slots=True)
class Drop:
    """An opened drop file: untrusted `meta`, the submitter's uid, the body stream, and when
    it arrived in new/ (its inode change time: set by the rename into new/, and no later
    change by its owner can move it back, unlike the mtime or the `time` in `meta`)."""

    name: str
    meta: dict[str, Any]
    uid: int
    body_size: int
    body: BinaryIO
    arrived: float

    def close(self) -> None:
        self.body.close()


def open_drop(path: Path) -> Drop:
    """Open and check one file of new/ (blocking). Raises CorruptDrop, or OSError for I/O
    trouble (FileNotFoundError: someone else took it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        if err.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
            raise CorruptDrop("symbolic link") from None
        raise
    f = open(fd, "rb", buffering=64 * 1024)  # noqa: SIM115 - owned by the Drop
    try:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise CorruptDrop("not a regular file")
        if info.st_nlink != 1:
            raise CorruptDrop(f"{info.st_nlink} hard links")
        first = f.read(FIRST_LINE_LENGTH)
        digits = first[len(MAGIC) : -1]
        if len(first) != FIRST_LINE_LENGTH or not first.startswith(MAGIC) or not digits.isdigit():
            raise CorruptDrop("bad first line")
        line = f.readline(MAX_META + 1)
        if not line.endswith(b"\n"):
            raise CorruptDrop("meta line too long or truncated")
        try:
            meta = json.loads(line)
        except ValueError:
            raise CorruptDrop("meta line is not JSON") from None
        if not isinstance(meta, dict):
            raise CorruptDrop("meta line is not a JSON object")
        body_size = int(digits)
        if info.st_size != FIRST_LINE_LENGTH + len(line) + body_size:
            raise CorruptDrop(
                f"size mismatch: file {info.st_size}, expected"
                f" {FIRST_LINE_LENGTH + len(line) + body_size}"
            )
        return Drop(path.name, meta, info.st_uid, body_size, f, info.st_ctime)
    except BaseException:
        f.close()
        raise
