"""The user database: a Dovecot-compatible passwd-file with argon2id hashes.

Format (Dovecot's passwd-file, one user a line, fields may be empty):
    alice@a.example:{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$salt$hash:uid:gid:gecos:home:shell:extra
Comment lines (`#`), blank lines and lines we do not understand are kept verbatim on rewrite, so
the same file can serve Dovecot's `passdb { driver = passwd-file }` with `%Lu` user names.

Users are full addresses (virtual domains: each local domain has its own users, see
`mailbox.layout`). A bare name in the file (written before virtual domains) is a user of the
primary (first) local domain; `mailbox.migrate` rewrites such lines to the full address. A bare
*login* is taken as `<name>@<domain>` when there is exactly one local domain (Dovecot's
`auth_default_realm`), and refused when there are several: it would be ambiguous.

In: the file path and the local domains. Out: `names()` (canonical addresses), `resolve()` (a
login name -> its user), `verify()`, and the admin mutations `add`, `set_password`, `delete`.
Rewrites keep the file's owner, group and mode (so `user passwd` does not take Dovecot's read
access away), or apply the configured `users_file_mode` / `users_file_group`. The file is re-read when its (mtime, size, inode) changes, so `mailhaven user add` in
another process is seen without a restart. A file that is not UTF-8 or has a line that is
neither blank, a comment nor `name:password[:...]` with a valid name (or names a user twice) is
refused whole with `UsersFileError` naming the line: at start-up and `config check` that is an
error; a changed file that is refused is logged and the last good one stays in service. Rewrites take `<file>.lock` (flock), re-read the file
under it, write `<file>.tmp`, fsync, rename over, then fsync the directory: readers see the old
file or the new one, never half of either.

SECURITY: hashes are argon2id (argon2-cffi). Verification is CPU-heavy, so `verify` runs it in a
worker thread; an unknown user is checked against a dummy hash so the answer takes about as long
as for a known one. Names are canonicalised by `mailbox.layout.canonical_name` (lower case,
dot-atom local part without `/`, LDH domain), because they also name the Maildir directory.

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
RFC 9106's second recommended ("low memory") profile, argon2id m=64 MiB t=3 p=4. We keep it rather than drop to OWASP's minimum (m=19 MiB t=2 p=1): with the
concurrency bound the server's memory no longer grows with logins, and the memory cost is what
makes an offline attack on a stolen users file expensive.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import threading
from collections.abc import Iterable, Iterator, KeysView
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from mailhaven.mailbox.layout import MAX_LOCAL, canonical_name, normalize_domain, split_name

#: Dovecot's scheme names for argon2 hashes we can verify.
SCHEMES = ("{ARGON2ID}", "{ARGON2I}")
FIELDS = 8  # user:password:uid:gid:gecos:home:shell:extra
#: The users file's mode when nothing says otherwise: the hashes are secrets.
DEFAULT_FILE_MODE = 0o600
#: Kept for callers that name the old limit: a local part is at most 64 octets.
MAX_NAME = MAX_LOCAL
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
    """The canonical form of a user or login name (see `mailbox.layout.canonical_name`)."""
    return canonical_name(name)


class UserDB:
    """A passwd-file, cached in memory and reloaded when it changes on disk."""

    def __init__(
        self,
        path: Path,
        *,
        hasher: PasswordHasher | None = None,
        domains: Iterable[str] = (),
        file_mode: int | None = None,
        file_group: int | None = None,
    ) -> None:
        self.path = path
        #: the local domains, normalised, primary first; empty: names are taken as written
        self.domains = tuple(
            dict.fromkeys(d for d in map(normalize_domain, domains) if d is not None)
        )
        #: mode and group for rewrites (None: keep what the file has)
        self.file_mode = file_mode
        self.file_group = file_group
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
        self._hashes = _check(self.path, lines, self.primary)
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

    @property
    def primary(self) -> str | None:
        """The domain of a bare name in the file (the first local domain)."""
        return self.domains[0] if self.domains else None

    @property
    def realm(self) -> str | None:
        """The domain a bare login means: the only local domain, else none (ambiguous)."""
        return self.domains[0] if len(self.domains) == 1 else None

    def names(self) -> set[str]:
        """Every user, canonical (full addresses once local domains are known)."""
        self.reload_if_changed()
        return set(self._hashes)

    def current_names(self) -> KeysView[str]:
        """The users as of now, without copying them: a reload replaces the table whole, so
        the view stays the snapshot it was (the per-message lookups' way; `names` copies)."""
        self.reload_if_changed()
        return self._hashes.keys()

    def login_name(self, login: str) -> str | None:
        """The canonical user name a login means, whether or not that user exists; None for
        a name no user can have (bad syntax, or a bare name with several local domains)."""
        name = canonical_name(login)
        if name is None or "@" in name or not self.domains:
            return name
        return f"{name}@{self.realm}" if self.realm else None

    def resolve(self, login: str) -> str | None:
        """The existing user a login means (full address in any case, or a bare name where
        unambiguous), else None."""
        self.reload_if_changed()
        name = self.login_name(login)
        return name if name is not None and name in self._hashes else None

    async def verify(self, user: str, password: str) -> bool:
        """True when `password` is right for the user `user` names (see `resolve`); the
        hashing runs in the bounded pool, also for an unknown user (same time either way)."""
        name = self.resolve(user)
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
        """Add a user (a full address, or a bare name when there is one local domain); the
        canonical name written to the file is returned."""
        name = self._valid(user)
        with self._rewrite() as lines:
            if name in dict(_parse(lines, self.primary)):
                raise UserDBError(f"user {name} already exists")
            lines.append(":".join([name, self._scheme_hash(password)] + [""] * (FIELDS - 2)))
        return name

    def set_password(self, user: str, password: str) -> str:
        name = self._valid(user, new=False)
        with self._rewrite() as lines:
            index = _find(lines, name, self.primary)
            fields = lines[index].split(":", FIELDS - 1)
            fields[1] = self._scheme_hash(password)
            lines[index] = ":".join(fields)
        return name

    def delete(self, user: str) -> str:
        name = self._valid(user, new=False)
        with self._rewrite() as lines:
            del lines[_find(lines, name, self.primary)]
        return name

    def qualify_bare_names(self) -> list[str]:
        """Rewrite bare names in the file as `<name>@<primary domain>` (the upgrade to
        virtual domains; Dovecot looks users up by full address). The names changed."""
        if self.primary is None:
            return []
        changed: list[str] = []
        with self._rewrite(only_if_changed=True) as lines:
            for index, line in enumerate(lines):
                if not line.strip() or line.lstrip().startswith("#") or ":" not in line:
                    continue
                name, rest = line.split(":", 1)
                if "@" not in name and canonical_name(name) == name:
                    lines[index] = f"{name}@{self.primary}:{rest}"
                    changed.append(name)
        return changed

    def _valid(self, user: str, *, new: bool = True) -> str:
        name = canonical_name(user)
        if name is None or name != user.strip().lower():
            raise UserDBError(f"invalid user name: {user[:80]!r}")
        if not self.domains:
            return name
        if "@" not in name:
            if self.realm is None:
                raise UserDBError(
                    f"{name}: give the full address ({name}@<domain>): there are several"
                    f" local domains ({', '.join(self.domains)})"
                )
            return f"{name}@{self.realm}"
        domain = split_name(name)[1]
        if new and domain not in self.domains:
            raise UserDBError(
                f"{name}: {domain} is not a local domain (add it to local_domains first)"
            )
        return name

    def _scheme_hash(self, password: str) -> str:
        if not password:
            raise UserDBError("empty password")
        return "{ARGON2ID}" + self._hasher.hash(password)

    @contextlib.contextmanager
    def _rewrite(self, *, only_if_changed: bool = False) -> Iterator[list[str]]:
        """Lock, re-read, let the caller edit the lines, write atomically, reload."""
        lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            self.load()
            lines = list(self._lines)
            yield lines
            if only_if_changed and lines == self._lines:
                return
            _atomic_write(
                self.path, "".join(f"{line}\n" for line in lines), self.file_mode, self.file_group
            )
            self.load()
        finally:
            os.close(lock_fd)

    def apply_file_owner(self) -> None:
        """Give an existing users file the configured mode and group now (start-up), so a
        file made before they were configured is readable by Dovecot's auth too."""
        if self.file_mode is None and self.file_group is None:
            return
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return
        if self.file_group is not None and st.st_gid != self.file_group:
            os.chown(self.path, -1, self.file_group)
        if self.file_mode is not None and st.st_mode & 0o777 != self.file_mode:
            os.chmod(self.path, self.file_mode)


def _decode(path: Path, data: bytes) -> list[str]:
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UsersFileError(f"{path}: line {line}: not valid UTF-8") from None


def _qualified(name: str, primary: str | None) -> str:
    """A bare name in the file is a user of the primary domain."""
    return f"{name}@{primary}" if primary and "@" not in name else name


def _check(path: Path, lines: list[str], primary: str | None = None) -> dict[str, str]:
    """name -> password of every user line; `UsersFileError` at the first malformed line."""
    found: dict[str, tuple[int, str]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if ":" not in line:
            raise UsersFileError(f"{path}: line {number}: expected user:password[:...]")
        name, password = line.split(":", 2)[:2]
        if canonical_name(name) != name:
            raise UsersFileError(
                f"{path}: line {number}: {name[:80]!r} is not a valid user name (lower case"
                f" user@domain, a dot-atom local part without '/', at most {MAX_LOCAL} octets)"
            )
        name = _qualified(name, primary)
        if name in found:
            raise UsersFileError(
                f"{path}: line {number}: user {name} again (first on line {found[name][0]})"
            )
        found[name] = (number, password)
    return {name: password for name, (_number, password) in found.items()}


def _parse(lines: list[str], primary: str | None = None) -> Iterator[tuple[str, str]]:
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#") or ":" not in line:
            continue
        name, password = line.split(":", 2)[:2]
        if canonical_name(name) == name:
            yield _qualified(name, primary), password


def _find(lines: list[str], name: str, primary: str | None = None) -> int:
    for index, line in enumerate(lines):
        if line.lstrip().startswith("#") or ":" not in line:
            continue
        if _qualified(line.split(":", 1)[0], primary) == name:
            return index
    raise UserDBError(f"no such user: {name}")


def _atomic_write(path: Path, text: str, mode: int | None = None, group: int | None = None) -> None:
    """Replace `path` by `text` durably, with the old file's owner, group and mode unless
    `mode` / `group` say otherwise (a new file: 0600, ours)."""
    uid = gid = -1
    old_second: int | None = None
    try:
        st = path.stat()
        uid, gid = st.st_uid, st.st_gid
        mode = st.st_mode & 0o777 if mode is None else mode
        old_second = st.st_mtime_ns // 1_000_000_000
    except FileNotFoundError:
        mode = DEFAULT_FILE_MODE if mode is None else mode
    if group is not None:
        gid = group
    tmp = path.with_name(f"{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            _own(f.fileno(), uid, gid, mode)
            f.write(text)
            f.flush()
            if old_second is not None:
                _later_second(f.fileno(), old_second)
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


def _later_second(fd: int, old_second: int) -> None:
    """Give the new file an mtime in a later second than the old one's. Dovecot's passwd-file
    driver re-reads the file only when its mtime in whole seconds or its size changes, so a
    password changed within the second of the last write (same hash length) would otherwise
    never reach it."""
    st = os.fstat(fd)
    if st.st_mtime_ns // 1_000_000_000 <= old_second:
        os.utime(fd, ns=(st.st_atime_ns, (old_second + 1) * 1_000_000_000))


def _own(fd: int, uid: int, gid: int, mode: int) -> None:
    """Owner, group and mode for the new file before it replaces the old one (as root; a
    plain user can keep its own file's group if it is a member, else the group is its own)."""
    st = os.fstat(fd)
    if (uid, gid) != (-1, -1) and (uid, gid) != (st.st_uid, st.st_gid):
        try:
            os.fchown(fd, uid if os.geteuid() == 0 else -1, gid)
        except PermissionError:
            log.warning("users file: cannot give the new file group %d; it keeps %d", gid,
                        st.st_gid)
    os.fchmod(fd, mode)  # not through os.open: the umask would clear group bits
