"""Maildir storage: the durable, lock-free mailbox format that Dovecot, mutt and POP3 read.

Role: write one message into `<mail_root>/<domain>/<user>/` following the Maildir protocol
(https://cr.yp.to/proto/maildir.html) and Dovecot's naming conventions, and list what is there
for the POP3 role. Nothing here knows about SMTP, the queue or routing.

In: a stream of byte chunks plus a small `prepend` (Return-Path / Delivered-To lines).
Out: the path of the file in `new/`, or an exception (`OSError` and friends); the caller maps it
to a reply.

Invariants:

* A file appears in `new/` only after its data was fsync'd, and then `new/` itself is fsync'd.
  Where the system has `O_TMPFILE` (Linux) the file is written unnamed in `tmp/`'s file system
  and linked into `new/` (one directory change per copy instead of three, and no `tmp/`
  directory shared by concurrent copies); elsewhere it is written under a name in `tmp/` and
  renamed into `new/` (as Dovecot does; the name is unique, so nothing is clobbered). When
  `deliver` returns, the message survives a power cut; this is what lets the local agent
  answer 250 and the scheduler forget the queue entry.
* Deliveries into one `new/` at the same time share its fsync (`DirectorySync`, a group
  commit): an fsync that *started* after a file was renamed into it makes that name durable, so a
  delivery that finds one already running waits for the next and reuses it, instead of queueing
  an fsync of its own behind it.
* If anything fails before that point nothing is left in `new/` and the `tmp/` file is removed.
  (A crash, as opposed to an exception, may leave a named `tmp/` file; readers never look at
  `tmp/`, and the spec lets a cleaner remove files older than 36 hours. An unnamed one is
  freed by the kernel.)
* Names are unique without locks: `<secs>.M<usec>P<pid>Q<counter>.<host>` (Dovecot's style, the
  counter covers many deliveries in one microsecond), then `,S=<size>,W=<vsize>` when it moves to
  `new/`. `S=` is the exact size in bytes of the file as stored, so readers need no stat; `W=` is
  the size with CRLF line endings (Dovecot's "virtual size"), which is what POP3 LIST must report
  (RFC 1939 §5 counts octets as sent on the wire).
* Line endings are stored as LF, the Maildir/Unix convention that Dovecot and mutt expect; the
  CRLF of SMTP is turned into LF while streaming. Only CR LF pairs are converted (bare CR and bare
  LF pass untouched) and a CR that ends one chunk is held back until the next chunk shows whether
  an LF follows, so the result is independent of how the input was chunked.

Trust: `user` names come from routing and are validated here once more (`mailbox.layout`:
no path separators, no leading dot, lower-case) because they become directory names.

Owner and modes: by default 0700 directories and 0600 files, the process's own. A `MailOwner`
(`[mailbox] mail_user`/`mail_group`/modes, see `mailbox.owner`) is applied to each directory
made and to each file while it is still in `tmp/`, so Dovecot can share the Maildirs.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mailhaven.faults import crash_point
from mailhaven.mailbox import layout
from mailhaven.mailbox.owner import MailOwner
from mailhaven.proto.message_bytes import BARE_CR, count_byte, crlf_to_lf

#: Maildir spec: a maildir is these three directories.
SUBDIRS = ("tmp", "new", "cur")
#: Mailboxes are private to their owner.
DIR_MODE = 0o700
FILE_MODE = 0o600
#: Write buffer; the message itself is never held in memory whole.
WRITE_BUFFER = 64 * 1024
#: Attempts at finding an unused name before giving up (a collision needs pid reuse within
#: one microsecond on the same host; retrying is cheap and removes the doubt).
NAME_ATTEMPTS = 5


def mailbox_path(mail_root: Path, user: str) -> Path:
    """`<mail_root>/<domain>/<user>` for a canonical `user@domain` (see `mailbox.layout`),
    refusing anything that is not a safe mailbox name."""
    return layout.mailbox_path(mail_root, user)


#: Maildirs this process has made sure of, so that a delivery does not try five mkdirs (each
#: failing with FileExistsError) every time; a Maildir removed meanwhile is made again.
_ENSURED: set[Path] = set()


def ensure_maildir(path: Path, owner: MailOwner | None = None) -> None:
    """Create `path` and its `tmp/ new/ cur/` (mode 0700, or `owner`'s) if missing; idempotent.

    A directory we create is made durable (its parent is fsync'd), or a power cut could take a
    new user's whole maildir, and the message in it, away after we said 250. The mail root
    itself is created with default permissions if missing; the user directory gets 0700.
    If that fsync fails, what we created is removed again, so the next attempt retries it.
    """
    path.parent.parent.mkdir(parents=True, exist_ok=True)
    if _mkdir(path.parent):  # the domain's directory: durable, and shared like the rest
        if owner is not None:
            owner.apply_to_dir(path.parent)
        _fsync_or_undo(path.parent.parent, [path.parent])
    if _mkdir(path):
        if owner is not None:
            owner.apply_to_dir(path)
        _fsync_or_undo(path.parent, [path])
    created = [path / sub for sub in SUBDIRS if _mkdir(path / sub)]
    if owner is not None:
        for directory in created:
            owner.apply_to_dir(directory)
    if created:
        _fsync_or_undo(path, created)


def _fsync_or_undo(parent: Path, created: list[Path]) -> None:
    try:
        _fsync_dir(parent)
    except BaseException:
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise


def _mkdir(path: Path) -> bool:
    """mkdir with DIR_MODE; True if it was created now."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return False
    return True


def escape_hostname(hostname: str) -> str:
    """Escape `/` and `:` in a host name the way Dovecot does (`\\057`, `\\072`).

    `/` cannot appear in a file name and `:` separates the info part (`:2,flags`).
    """
    return hostname.replace("/", "\\057").replace(":", "\\072")


#: This process's id, for names: asked once, and again in a child after fork() (a syscall
#: per copy otherwise).
_PID = os.getpid()


def _refresh_pid() -> None:
    global _PID
    _PID = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)


class UniqueNames:
    """Source of unique Maildir base names: `<secs>.M<usec>P<pid>Q<counter>.<host>`.

    Thread-safe (deliveries run in worker threads: `next()` of an `itertools.count` is atomic).
    `clock` returns nanoseconds since the epoch and is injectable for tests; the pid is the
    current process's, so a forked child differs.
    """

    def __init__(
        self, hostname: str | None = None, clock: Callable[[], int] = time.time_ns
    ) -> None:
        self._host = escape_hostname(hostname or socket.gethostname())
        self._clock = clock
        self._counter = itertools.count(1)

    def next(self) -> str:
        counter = next(self._counter)
        ns = self._clock()
        secs, usec = ns // 1_000_000_000, (ns // 1000) % 1_000_000
        return f"{secs}.M{usec}P{_PID}Q{counter}.{self._host}"


class _CrlfToLf:
    """Streaming CR LF -> LF conversion that holds back a trailing CR between chunks; with
    `no_bare_cr` (every CR starts a pair) it deletes each CR instead, nothing held back."""

    def __init__(self, no_bare_cr: bool = False) -> None:
        self._pending_cr = False
        self._delete_cr = no_bare_cr

    def feed(self, chunk: bytes) -> bytes:
        if self._delete_cr:
            return chunk.replace(b"\r", b"")
        if self._pending_cr:
            chunk = b"\r" + chunk
        self._pending_cr = chunk.endswith(b"\r")
        if self._pending_cr:
            chunk = chunk[:-1]
        return chunk.replace(b"\r\n", b"\n")

    def close(self) -> bytes:
        out = b"\r" if self._pending_cr else b""
        self._pending_cr = False
        return out


def deliver(
    maildir: Path,
    message: Iterable[bytes] | bytes,
    *,
    prepend: bytes = b"",
    names: UniqueNames,
    owner: MailOwner | None = None,
    no_bare_cr: bool = False,
) -> Path:
    """Store one message in `maildir/new/` durably and return its path.

    `message` is the whole message as one `bytes` (converted and written in one go), or a stream
    of chunks (converted and written as they come, never joined). `prepend` is written first
    (it goes through the same CRLF -> LF conversion). `no_bare_cr`: the caller knows `message`
    holds no bare CR (SMTP's framing refused them), so the conversion deletes every CR without
    searching for one there first (`prepend`, small, is still checked). Any exception,
    including one raised by the chunks' iterator itself, leaves nothing in `new/` and no file
    in `tmp/`.
    """
    if maildir not in _ENSURED:
        ensure_maildir(maildir, owner)
        _ENSURED.add(maildir)
    try:
        base, fd = _create_tmp(maildir, names)
    except FileNotFoundError:  # removed since we made it: make it again, once
        ensure_maildir(maildir, owner)
        base, fd = _create_tmp(maildir, names)
    tmp_path = maildir / "tmp" / base if base is not None else None
    final: Path | None = None
    try:
        try:
            if owner is not None:  # before any reader can see it in new/
                _apply_owner(fd, owner)
            clean = no_bare_cr and BARE_CR.search(prepend) is None
            if isinstance(message, bytes):
                data = crlf_to_lf(prepend + message, no_bare_cr=clean)
                _write_all(fd, data)
                size, lines = len(data), count_byte(data, b"\n")
            else:
                size, lines = _write_converted(fd, _with_prepend(prepend, message), clean)
            os.fsync(fd)
            final = _publish(maildir, fd, base, names, f",S={size},W={size + lines}")
        finally:
            os.close(fd)
        DIRECTORY_SYNC.sync(final.parent)  # the name durable: shared with the copies beside it
    except BaseException as exc:
        if isinstance(exc, FileNotFoundError):  # new/ went away: check all of it next time
            _ENSURED.discard(maildir)
        if tmp_path is not None:
            _unlink_quietly(tmp_path)
        if final is not None:
            _unlink_quietly(final)  # not known to be durable: do not claim it
        raise
    return final


def _with_prepend(prepend: bytes, chunks: Iterable[bytes]) -> Iterator[bytes]:
    if prepend:
        yield prepend
    yield from chunks


def _create_tmp(maildir: Path, names: UniqueNames) -> tuple[str | None, int]:
    """An open file for the copy in `tmp/`: unnamed (`O_TMPFILE`) where the system has it,
    else under a fresh unique name (returned; None for an unnamed one)."""
    if _unnamed.usable:
        try:
            return None, os.open(f"{maildir}/tmp", _UNNAMED_FLAGS, FILE_MODE)
        except OSError as exc:
            if exc.errno not in _NO_UNNAMED:
                raise
            _unnamed.usable = False  # this kernel or file system has none: named from now on
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    tmp_dir = f"{maildir}/tmp/"
    for _ in range(NAME_ATTEMPTS):
        base = names.next()
        try:
            return base, os.open(tmp_dir + base, flags, FILE_MODE)
        except FileExistsError:
            continue
    raise FileExistsError(f"no unused Maildir name in {maildir / 'tmp'}")


def _apply_owner(fd: int, owner: MailOwner) -> None:
    """The owner's ids and mode on a new file; nothing to do (and nothing asked of the kernel)
    when it keeps the process's ids and the mode the file was created with survived the umask."""
    if owner.uid == owner.gid == -1 and owner.file_mode == FILE_MODE and _umask_keeps_mode():
        return
    owner.apply_to_fd(fd)


@functools.cache
def _umask_keeps_mode() -> bool:
    """Whether the process's umask leaves FILE_MODE whole: read once, from /proc (Linux); where
    it cannot be read, each file is checked as before. Nothing here widens the umask later (the
    control socket narrows it for a moment, to 0177, which keeps FILE_MODE)."""
    with (
        contextlib.suppress(OSError, ValueError),
        open("/proc/self/status", encoding="ascii", errors="replace") as status,
    ):
        for line in status:
            if line.startswith("Umask:"):
                return not int(line.split()[1], 8) & FILE_MODE
    return False


def _write_all(fd: int, data: bytes) -> None:
    """`write(2)` until all of `data` is in the file (a regular file rarely takes less)."""
    written = os.write(fd, data)
    if written == len(data):
        return
    with memoryview(data) as view:
        while written < len(view):
            n = os.write(fd, view[written:])
            if n <= 0:
                raise OSError(errno.EIO, "write to a Maildir file made no progress")
            written += n


def _write_converted(fd: int, chunks: Iterable[bytes], no_bare_cr: bool) -> tuple[int, int]:
    """Write converted chunks, batched up to WRITE_BUFFER per `write(2)`; return (bytes
    written, LF count) for `S=` and `W=`."""
    conv = _CrlfToLf(no_bare_cr)
    size = lines = pending = 0
    batch: list[bytes] = []
    for chunk in chunks:
        data = conv.feed(chunk)
        if not data:
            continue
        size += len(data)
        lines += data.count(b"\n")
        batch.append(data)
        pending += len(data)
        if pending >= WRITE_BUFFER:
            _write_all(fd, b"".join(batch))
            batch.clear()
            pending = 0
    tail = conv.close()
    batch.append(tail)
    if pending or tail:
        _write_all(fd, b"".join(batch))
    return size + len(tail), lines


def _publish(maildir: Path, fd: int, base: str | None, names: UniqueNames, suffix: str) -> Path:
    """Give the written, fsync'd file its name in `new/`, with its sizes in the name.

    An unnamed file is linked there under a fresh unique name (`linkat` through `/proc`, as
    open(2) documents for `O_TMPFILE`): one directory change, none in `tmp/`, and a crash before
    it leaves nothing behind. A named one is moved with `rename`, not the spec's `link` +
    `unlink`: one directory operation less, and it cannot clobber anything, because the base
    name is unique (pid, microsecond, counter and host; created with O_EXCL in `tmp/`). Dovecot
    does the same; the spec's `link` would not protect a file a reader has already moved on to
    `cur/` anyway.
    """
    new_dir = f"{maildir}/new/"
    crash_point("maildir_tmp_written")
    if base is not None:
        final = new_dir + base + suffix
        os.rename(f"{maildir}/tmp/{base}", final)
    else:
        for _ in range(NAME_ATTEMPTS):
            final = new_dir + names.next() + suffix
            try:
                os.link(f"self/fd/{fd}", final, src_dir_fd=_unnamed.proc(), follow_symlinks=True)
                break
            except FileExistsError:
                continue
            except OSError as exc:
                if exc.errno in _NO_LINK:  # /proc cannot give it a name here: this copy
                    _unnamed.usable = False  # fails (and is tried again), the next are named
                raise
        else:
            raise FileExistsError(f"no unused Maildir name in {new_dir}")
    crash_point("maildir_linked")
    return Path(final)


class _Unnamed:
    """Whether copies start as unnamed files (`O_TMPFILE`), and the `/proc` directory their
    link goes through (opened once; `self` in it is whichever process looks, so a fork keeps
    it right)."""

    def __init__(self) -> None:
        self.usable = bool(_O_TMPFILE) and os.path.isdir("/proc/self/fd")
        self._proc: int | None = None
        self._lock = threading.Lock()

    def proc(self) -> int:
        if self._proc is None:
            with self._lock:
                if self._proc is None:
                    self._proc = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self._proc


_O_TMPFILE: int = getattr(os, "O_TMPFILE", 0)
_UNNAMED_FLAGS = os.O_WRONLY | _O_TMPFILE | getattr(os, "O_CLOEXEC", 0)
#: what `open(O_TMPFILE)` says where the kernel or the file system lacks it
_NO_UNNAMED = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOSYS})
#: what that `linkat` says where `/proc` cannot name the file (a sandbox, a chroot)
_NO_LINK = frozenset({errno.ENOENT, errno.EXDEV, errno.EPERM, errno.EACCES, errno.ENOTDIR})
_unnamed = _Unnamed()


class DirectorySync:
    """Group commit for directory fsyncs, shared by the threads that deliver.

    Per directory: a ticket is taken after the caller's rename; an fsync records the last ticket
    issued when it began, and completes every ticket up to it. A caller returns once a
    successful fsync covered its ticket; when none runs, it runs one itself. A failed fsync
    fails only its runner, and the waiters try again themselves (none is told "durable"
    without an fsync that began after its rename)."""

    def __init__(self, fsync: Callable[[Path], None] | None = None) -> None:
        self._fsync = fsync or _fsync_dir
        self._cond = threading.Condition()
        #: directory -> [last ticket issued, last ticket made durable, an fsync is running]
        self._dirs: dict[Path, list[int]] = {}

    def sync(self, path: Path) -> None:
        with self._cond:
            state = self._dirs.setdefault(path, [0, 0, 0])
            state[0] += 1
            mine = state[0]
            while state[1] < mine:
                if not state[2]:
                    state[2] = 1
                    covers = state[0]
                    break
                self._cond.wait()
            else:
                return
        ok = False
        try:
            self._fsync(path)
            ok = True
        finally:
            with self._cond:
                state[2] = 0
                if ok:
                    state[1] = max(state[1], covers)
                if state[1] >= state[0]:
                    del self._dirs[path]  # nobody waits: forget it (bounded by directories)
                self._cond.notify_all()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: the process's one group commit for `new/` directories
DIRECTORY_SYNC = DirectorySync()


def _unlink_quietly(path: Path) -> None:
    """Best-effort cleanup on a failure path: never mask the original error."""
    with contextlib.suppress(OSError):
        os.unlink(path)


# --- reading, for the POP3 role ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One message found in a maildir.

    `key` is the unique base name: the file name up to the `:2,` info part. It does not change
    when a reader moves the file from `new/` to `cur/` or changes its flags, so it is a stable
    identifier (e.g. for POP3 UIDL; note RFC 1939 §7 caps a UIDL at 70 characters).
    """

    key: str
    path: Path
    subdir: Literal["new", "cur"]
    #: Bytes on disk (from `S=`, or stat when the name has none).
    size: int
    #: Size with CRLF line endings (from `W=`), None when the name does not say.
    vsize: int | None
    #: Maildir flags after `:2,` (e.g. "S" seen), "" if none.
    flags: str


def parse_name(name: str) -> tuple[str, int | None, int | None, str]:
    """Split a Maildir file name into (key, S= size, W= size, flags)."""
    key, _, info = name.partition(":")
    flags = info[2:] if info.startswith("2,") else ""
    size = vsize = None
    for field in key.split(",")[1:]:
        tag, _, value = field.partition("=")
        if value.isdigit():
            if tag == "S":
                size = int(value)
            elif tag == "W":
                vsize = int(value)
    return key, size, vsize, flags


def list_messages(maildir: Path) -> list[StoredMessage]:
    """List the messages in `new/` and `cur/`, oldest name first; [] if the maildir is absent.

    Dot files are skipped (the spec reserves them). A file that vanishes while we look (another
    reader deleted it) is skipped too. Names sort by their leading seconds, so the order is the
    order of arrival to the second.
    """
    found: list[StoredMessage] = []
    subdirs: tuple[Literal["new", "cur"], ...] = ("new", "cur")
    for sub in subdirs:
        try:
            names = os.listdir(maildir / sub)
        except FileNotFoundError:
            continue
        for name in names:
            if name.startswith("."):
                continue
            path = maildir / sub / name
            key, size, vsize, flags = parse_name(name)
            if size is None:
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    continue
            found.append(StoredMessage(key, path, sub, size, vsize, flags))
    found.sort(key=lambda m: m.key)
    return found
