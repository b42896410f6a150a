"""The user database: a Dovecot-compatible passwd-file with argon2id hashes.

Format (Dovecot's passwd-file, one user a line, fields may be empty):
    user:{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$salt$hash:uid:gid:gecos:home:shell:extra
Comment lines (`#`), blank lines and lines we do not understand are kept verbatim on rewrite, so
the same file can serve Dovecot's `passdb { driver = passwd-file }`.

In: the file path. Out: `names()`, `verify()`, and the admin mutations `add`, `set_password`,
`delete`. The file is re-read when its (mtime, size, inode) changes, so `mailhaven user add` in
another process is seen without a restart. A file that is not UTF-8 or has a line that is
neither blank, a comment nor `name:password[:...]` with a valid name (or names a user twice) is
refused whole with `UsersFileError` naming the line: at start-up and `config check` that is an
error; a changed file that is refused is logged and the last good one stays in service. Rewrites take `<file>.lock` (flock), re-read the file
under it, write `<file>.tmp`, fsync, rename over, then fsync the directory: readers see the old
file or the new one, never half of either.

SECURITY: hashes are argon2id (argon2-cffi). Verification is CPU-heavy, so `verify` runs it in a
worker thread; an unknown user is checked against a dummy hash so the answer takes about as long
as for a known one. Names are lower-cased and must be a dot-atom local part (RFC 5322 §3.4.1)
without `/`, because they also name the Maildir directory.

MEMORY: an argon2 verification allocates the hash's memory cost (64 MiB for argon2-cffi's
defaults) for as long as it runs, so N logins at once would need N x 64 MiB. Every verification
in the process (SMTP AUTH and POP3 alike, every `UserDB` instance, including the one a config
reload builds) therefore runs in one dedicated pool of `VERIFY_CONCURRENCY` threads; further
logins wait in its queue (a cheap future each), like Dovecot's auth process serialises them.
Peak memory for hashing is then `VERIFY_CONCURRENCY` x the largest memory cost in the file, and
the event loop's default executor (used for Maildir I/O) is never tied up by waiting logins.
The pool is per process: a forked child makes its own.

Parameters: a stored hash is verified with the parameters encoded in it (`$m=..,t=..,p=..$`), so
hashes made by Dovecot or by older versions keep working. New hashes keep argon2-cffi's default,
RFC 9106's second recommended ("low memory") profile, argon2id m=64 MiB t=3 p=4 (about 90 ms on
a small host). We keep it rather than drop to OWASP's minimum (m=19 MiB t=2 p=1): with the
concurrency bound the server's memory no longer grows with logins, and the memory cost is what
makes an offline attack on a stolen users file expensive.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import secrets
import threading
import unicodedata
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

#: RFC 5321 §4.5.3.1.1: a local part is at most 64 octets.
MAX_NAME = 64
#: Dovecot's scheme names for argon2 hashes we can verify.
SCHEMES = ("{ARGON2ID}", "{ARGON2I}")
_ATEXT = r"[a-z0-9!#$%&'*+=?^_`{|}~-]+"  # RFC 5322 atext, lower case, without "/"
_NAME = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")
FIELDS = 8  # user:password:uid:gid:gecos:home:shell:extra
#: How many password verifications may run at once in this process (see MEMORY above). Each
#: default-parameter verify already uses p=4 lanes, so two keep a small host's CPUs busy.
VERIFY_CONCURRENCY = 2

log = logging.getLogger("mailhaven.auth")

_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def _verify_pool() -> ThreadPoolExecutor:
    """The process-wide verification pool, made on first use (again in a forked child)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(VERIFY_CONCURRENCY, thread_name_prefix="mailhaven-verify")
            _pool_pid = os.getpid()
        return _pool


class UserDBError(Exception):
    """An admin operation that cannot be done; the message says why."""


class UsersFileError(UserDBError):
    """The users file cannot be used as a whole; the message names the file and the line."""


@dataclass(frozen=True, slots=True)
class _Signature:
    mtime_ns: int
    size: int
    inode: int


def normalize_name(name: str) -> str | None:
    """The canonical user name (NFKC, outer white space removed, lower case), or None when it is
    not a valid one. Logins, the lookup and the failed-login limiter all use this one form, so
    look-alike spellings of a name can neither dodge its failure count nor open another entry."""
    lowered = unicodedata.normalize("NFKC", name).strip().lower()
    if len(lowered) > MAX_NAME or not _NAME.fullmatch(lowered):
        return None
    return lowered


class UserDB:
    """A passwd-file, cached in memory and reloaded when it changes on disk."""

    def __init__(self, path: Path, *, hasher: PasswordHasher | None = None) -> None:
        self.path = path
        self._hasher = hasher or PasswordHasher()
        self._lines: list[str] = []
        self._hashes: dict[str, str] = {}
        self._signature: _Signature | None = None
        #: a changed file that was refused: not read (and logged) again until it changes again
        self._refused: _Signature | None = None
        self._dummy: str | None = None
        self._lock = threading.Lock()

    # -- reading -------------------------------------------------------------------------------
    def load(self) -> None:
        """Read the file now (a missing file is an empty database); `UsersFileError` when it
        is malformed, and then what was loaded before stays."""
        with self._lock:
            self._load_locked()

    def _load_locked(self) -> None:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            self._lines, self._hashes, self._signature = [], {}, None
            return
        except OSError as err:
            raise UsersFileError(f"{self.path}: cannot read: {err.strerror}") from None
        lines = _decode(self.path, data)
        self._hashes = _check(self.path, lines)
        self._lines = lines
        self._signature = _Signature(st.st_mtime_ns, st.st_size, st.st_ino)

    def reload_if_changed(self) -> bool:
        """Re-read the file if its mtime, size or inode moved; True when it did. A changed
        file that is malformed is logged once and the last good one stays in service."""
        try:
            st = self.path.stat()
            sig: _Signature | None = _Signature(st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            sig = None
        if sig == self._signature or (sig is not None and sig == self._refused):
            return False
        try:
            self.load()
        except UsersFileError as err:
            self._refused = sig
            log.error("users file refused, keeping the last good one: %s", err)
            return False
        return True

    def names(self) -> set[str]:
        self.reload_if_changed()
        return set(self._hashes)

    async def verify(self, user: str, password: str) -> bool:
        """True when `password` is right for `user`; the hashing runs in the bounded pool."""
        self.reload_if_changed()
        name = normalize_name(user)
        stored = self._hashes.get(name) if name else None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_verify_pool(), self._verify, stored, password)

    def _verify(self, stored: str | None, password: str) -> bool:
        scheme = next((s for s in SCHEMES if stored and stored.startswith(s)), None)
        if stored is None or scheme is None:
            with contextlib.suppress(VerificationError, InvalidHashError):
                self._hasher.verify(self._dummy_hash(), password)
            return False
        try:
            return self._hasher.verify(stored[len(scheme):], password)
        except (VerificationError, InvalidHashError):
            return False

    def _dummy_hash(self) -> str:
        if self._dummy is None:
            self._dummy = self._hasher.hash(secrets.token_hex(16))
        return self._dummy

    # -- admin mutations -----------------------------------------------------------------------
    def add(self, user: str, password: str) -> str:
        name = _valid(user)
        with self._rewrite() as lines:
            if name in dict(_parse(lines)):
                raise UserDBError(f"user {name} already exists")
            lines.append(":".join([name, self._scheme_hash(password)] + [""] * (FIELDS - 2)))
        return name

    def set_password(self, user: str, password: str) -> None:
        name = _valid(user)
        with self._rewrite() as lines:
            index = _find(lines, name)
            fields = lines[index].split(":", FIELDS - 1)
            fields[1] = self._scheme_hash(password)
            lines[index] = ":".join(fields)

    def delete(self, user: str) -> None:
        name = _valid(user)
        with self._rewrite() as lines:
            del lines[_find(lines, name)]

    def _scheme_hash(self, password: str) -> str:
        if not password:
            raise UserDBError("empty password")
        return "{ARGON2ID}" + self._hasher.hash(password)

    @contextlib.contextmanager
    def _rewrite(self) -> Iterator[list[str]]:
        """Lock, re-read, let the caller edit the lines, write atomically, reload."""
        lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            self.load()
            lines = list(self._lines)
            yield lines
            _atomic_write(self.path, "".join(f"{line}\n" for line in lines))
            self.load()
        finally:
            os.close(lock_fd)


def _decode(path: Path, data: bytes) -> list[str]:
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UsersFileError(f"{path}: line {line}: not valid UTF-8") from None


def _check(path: Path, lines: list[str]) -> dict[str, str]:
    """name -> password of every user line; `UsersFileError` at the first malformed line."""
    found: dict[str, tuple[int, str]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if ":" not in line:
            raise UsersFileError(f"{path}: line {number}: expected user:password[:...]")
        name, password = line.split(":", 2)[:2]
        if normalize_name(name) != name:
            raise UsersFileError(
                f"{path}: line {number}: {name[:80]!r} is not a valid user name"
                f" (lower case, a dot-atom local part without '/', at most {MAX_NAME} octets)"
            )
        if name in found:
            raise UsersFileError(
                f"{path}: line {number}: user {name} again (first on line {found[name][0]})"
            )
        found[name] = (number, password)
    return {name: password for name, (_number, password) in found.items()}


def _parse(lines: list[str]) -> Iterator[tuple[str, str]]:
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#") or ":" not in line:
            continue
        name, password = line.split(":", 2)[:2]
        if normalize_name(name) == name:
            yield name, password


def _find(lines: list[str], name: str) -> int:
    for index, line in enumerate(lines):
        if not line.lstrip().startswith("#") and line.split(":", 1)[0] == name:
            return index
    raise UserDBError(f"no such user: {name}")


def _valid(user: str) -> str:
    name = normalize_name(user)
    if name is None or name != user.strip().lower():
        raise UserDBError(f"invalid user name: {user!r}")
    return name


def _atomic_write(path: Path, text: str) -> None:
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o600
    tmp = path.with_name(f"{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
