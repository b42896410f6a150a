"""POP3's view of one Maildir: snapshot at login, exclusive lock, UIDL, deletion at UPDATE.

In: a Maildir path (`<mail_root>/<user>/` with `tmp/ new/ cur/`, LF line endings, files named
`<unique>,S=<size>` in new/ and `<unique>,S=<size>:2,<flags>` in cur/). Out: a `Maildrop`, the
session's numbered, immutable list of messages plus its deletion and seen marks, and, at QUIT,
a `commit` that applies them to disk.

Invariants (RFC 1939 §8 and the Maildir spec):
- The snapshot is taken once at login; later deliveries stay in new/ untouched for the next
  session. A dropped connection commits nothing, so deletes happen only in the UPDATE state.
- The UIDL is the file's base name (everything before `:2,`), which survives the rename into cur/
  that any reader does when it changes flags. It equals Dovecot's `pop3_uidl_format=%f`. Names
  outside RFC 1939's UIDL alphabet or length are hashed, still deterministically.
- Sizes are CRLF octets, what RETR sends: a `,W=` field is trusted; else the file is read once and
  its bare LFs counted, and the result is cached by (maildir, base, stored size).
- Files are found again by base name when they moved meanwhile (an IMAP server renamed them).
- Retrieved messages that stay go to cur/ with the `S` flag, as Dovecot's POP3 would do.
- Deleted messages are taken off the Maildir++ quota (`maildirsize`, when there is one).
- One POP3 session per maildrop: `flock` on `mailhaven-pop3.lock` in the Maildir (a plain file at
  the root, which Maildir++ does not read as a folder). flock holds between open files of one
  process too, so it excludes both our other sessions and other processes.

SECURITY: names come from the filesystem, which the delivery agent writes; we still never build a
path from anything but a directory listing entry, and never follow a name containing `/`.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import hashlib
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from mailhaven.mailbox import quota
from mailhaven.mailbox.owner import MailOwner
from mailhaven.proto.pop3 import CrlfCounter

#: RFC 1939 §7 (UIDL): a unique-id is 1 to 70 characters in the range 0x21 to 0x7E.
MAX_UIDL = 70
LOCK_NAME = "mailhaven-pop3.lock"
#: Entries kept in the CRLF-size cache before the oldest half is dropped.
MAX_SIZE_CACHE = 100_000
READ_CHUNK = 64 * 1024

_UIDL_OK = re.compile(rf"[\x21-\x7e]{{1,{MAX_UIDL}}}")
_FIELD = re.compile(r",([A-Z])=(\d+)")
_USEC = re.compile(r"M(\d{1,6})(?!\d)")


@dataclass(frozen=True, slots=True)
class Message:
    """One message as the snapshot saw it."""

    uid: str  # the UIDL
    base: str  # file name up to `:2,`
    subdir: str  # "new" or "cur" at snapshot time
    name: str  # file name at snapshot time
    size: int  # CRLF octets


class Problem(enum.Enum):
    NO_SUCH_MESSAGE = "No such message"
    DELETED = "Message is deleted"


class Maildrop:
    """A session's numbered view of its snapshot: pure bookkeeping, no I/O."""

    def __init__(self, path: Path, messages: Sequence[Message]) -> None:
        self.path = path
        self.messages = tuple(messages)
        self._deleted: set[int] = set()
        self._seen: set[int] = set()

    def get(self, number: int) -> Message | Problem:
        if not 1 <= number <= len(self.messages):
            return Problem.NO_SUCH_MESSAGE
        if number in self._deleted:
            return Problem.DELETED
        return self.messages[number - 1]

    def live(self) -> list[tuple[int, Message]]:
        return [(n, m) for n, m in enumerate(self.messages, 1) if n not in self._deleted]

    def stat(self) -> tuple[int, int]:
        live = self.live()
        return len(live), sum(m.size for _, m in live)

    def delete(self, number: int) -> Problem | None:
        found = self.get(number)
        if isinstance(found, Problem):
            return found
        self._deleted.add(number)
        return None

    def mark_seen(self, number: int) -> None:
        self._seen.add(number)

    def reset(self) -> None:
        """RSET (RFC 1939 §5): unmark every deletion."""
        self._deleted.clear()

    @property
    def deleted(self) -> list[Message]:
        return [self.messages[n - 1] for n in sorted(self._deleted)]

    @property
    def seen(self) -> list[Message]:
        return [self.messages[n - 1] for n in sorted(self._seen - self._deleted)]


@dataclass(frozen=True, slots=True)
class CommitResult:
    deleted: int
    deleted_octets: int
    errors: tuple[str, ...]


class SizeCache:
    """CRLF sizes by (maildir, base, stored size); shared by sessions, used from threads."""

    def __init__(self, limit: int = MAX_SIZE_CACHE) -> None:
        self._sizes: dict[tuple[str, str, int], int] = {}
        self._lock = threading.Lock()
        self._limit = limit

    def get(self, key: tuple[str, str, int]) -> int | None:
        with self._lock:
            return self._sizes.get(key)

    def put(self, key: tuple[str, str, int], size: int) -> None:
        with self._lock:
            if len(self._sizes) >= self._limit:
                for old in list(self._sizes)[: self._limit // 2]:
                    del self._sizes[old]
            self._sizes[key] = size


# ------------------------------------------------------------------------------- names and order
def base_name(name: str) -> str:
    return name.split(":", 1)[0]


def uidl_for(base: str) -> str:
    """The UIDL of a base name: itself when RFC 1939 allows it, else a stable hash."""
    if _UIDL_OK.fullmatch(base):
        return base
    unique = base.split(",", 1)[0]
    if _UIDL_OK.fullmatch(unique):
        return unique
    return hashlib.sha256(base.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def _fields(base: str) -> dict[str, int]:
    return {k: int(v) for k, v in _FIELD.findall(base)}


def _order(base: str) -> tuple[int, int, str]:
    """Delivery order: Maildir names start with the delivery time, `<secs>.M<usec>` (Dovecot's
    and our style), compared as numbers: as text, M90292 would sort after M174847."""
    head, _, rest = base.partition(".")
    usec = _USEC.match(rest)
    return (int(head) if head.isdigit() else 0, int(usec.group(1)) if usec else 0, base)


# ------------------------------------------------------------------------------------- disk I/O
def ensure_maildir(path: Path) -> None:
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)


def scan(path: Path, cache: SizeCache) -> list[Message]:
    """Take the login snapshot (blocking: run it in a thread)."""
    found: dict[str, tuple[str, str]] = {}
    for subdir in ("new", "cur"):  # new/ first: a file renamed meanwhile is then seen in cur/
        with contextlib.suppress(FileNotFoundError), os.scandir(path / subdir) as it:
            for entry in it:
                if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                    continue
                found[base_name(entry.name)] = (subdir, entry.name)
    messages: list[Message] = []
    uids: set[str] = set()
    for base in sorted(found, key=_order):
        subdir, name = found[base]
        size = _crlf_size(path, base, subdir, name, cache)
        if size is None:  # vanished since the listing: not part of the snapshot
            continue
        uid = uidl_for(base)
        while uid in uids:  # duplicates only if hashing collided; keep UIDLs unique
            uid = hashlib.sha256(uid.encode()).hexdigest()[:40]
        uids.add(uid)
        messages.append(Message(uid, base, subdir, name, size))
    return messages


def _crlf_size(path: Path, base: str, subdir: str, name: str, cache: SizeCache) -> int | None:
    fields = _fields(base)
    if "W" in fields:
        return fields["W"]
    stored = fields.get("S")
    key = (str(path), base, stored if stored is not None else -1)
    if stored is not None and (cached := cache.get(key)) is not None:
        return cached
    counter = CrlfCounter()
    try:
        with open(path / subdir / name, "rb") as f:
            while chunk := f.read(READ_CHUNK):
                counter.feed(chunk)
    except FileNotFoundError:
        located = locate(path, base)
        if located is None:
            return None
        return _crlf_size(path, base, located.parent.name, located.name, cache)
    if stored is not None:
        cache.put(key, counter.size)
    return counter.size


def locate(path: Path, base: str) -> Path | None:
    """Find a message by base name, wherever flag changes have moved it."""
    for subdir in ("cur", "new"):
        with contextlib.suppress(FileNotFoundError), os.scandir(path / subdir) as it:
            for entry in it:
                if base_name(entry.name) == base:
                    return path / subdir / entry.name
    return None


def open_message(path: Path, message: Message) -> BinaryIO | None:
    """Open a snapshot message for reading; None when it is gone from the Maildir."""
    try:
        return open(path / message.subdir / message.name, "rb")
    except FileNotFoundError:
        located = locate(path, message.base)
        if located is None:
            return None
        try:
            return open(located, "rb")
        except FileNotFoundError:
            return None


def commit(drop: Maildrop) -> CommitResult:
    """The UPDATE state (RFC 1939 §6): delete marked messages, flag retrieved ones as seen."""
    path, errors = drop.path, []
    deleted = deleted_octets = freed = freed_count = 0
    for message in drop.deleted:
        current = _current(path, message)
        if current is not None:
            try:
                stored = quota.stored_size(current.name)
                if stored is None:
                    stored = current.stat().st_size
                current.unlink()
                freed += stored
                freed_count += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                errors.append(f"unlink {message.base}: {exc.strerror}")
                continue
        deleted += 1
        deleted_octets += message.size
    for message in drop.seen:
        current = _current(path, message)
        if current is None:
            continue
        target = path / "cur" / seen_name(current.name)
        if target != current:
            try:
                os.rename(current, target)
            except OSError as exc:
                errors.append(f"rename {message.base}: {exc.strerror}")
    for subdir in ("new", "cur"):
        _fsync_dir(path / subdir)
    try:
        quota.release(path, freed, freed_count)  # after the unlinks: low, never high
    except OSError as exc:
        errors.append(f"{quota.FILE_NAME}: {exc.strerror}")
    return CommitResult(deleted, deleted_octets, tuple(errors))


def _current(path: Path, message: Message) -> Path | None:
    snap = path / message.subdir / message.name
    return snap if snap.exists() else locate(path, message.base)


def seen_name(name: str) -> str:
    """`base` or `base:2,FLAGS` -> `base:2,FLAGS` with `S` added (flags kept in ASCII order)."""
    base, _, info = name.partition(":")
    flags = info[2:] if info.startswith("2,") else ""
    return f"{base}:2,{''.join(sorted(set(flags) | {'S'}))}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MaildropLock:
    """The one-session-per-maildrop lock; `acquire` returns None when another session holds it."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: Path, owner: MailOwner | None = None) -> MaildropLock | None:
        """`owner`: the Maildir's owner settings, so the lock file is the mail user's too."""
        fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if owner is not None:
                owner.apply_to_fd(fd)
        except OSError:
            os.close(fd)
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return cls(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
