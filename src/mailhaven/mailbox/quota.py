"""Maildir++ quota: the `maildirsize` file that Courier, Exim and Dovecot's quota plugin share.

Role: tell whether one more message fits a user's Maildir, and keep the running total current
when messages are added (delivery) or removed (POP3 DELE). Nothing here knows about SMTP.

Format (the Maildir++ quota specification, as Dovecot 2.3 `quota = maildir` reads and writes
it): the first line is the limit, `<bytes>S,<count>C` (either part may be absent; 0 or absent
means "no limit"; with no limit at all Dovecot writes `0S`); each further line is a delta
`<bytes> <count>`, appended with O_APPEND by whoever adds or removes mail. The sum of the deltas
is the usage. Sizes are the stored file sizes (the `,S=` in the name, else `stat`), counted over
`new/` and `cur/` of the INBOX and of every Maildir++ folder (`.Name/`).

Invariants:

* The file is only trusted when it parses completely. It is recalculated from the directories
  (and rewritten through a temporary file and a rename, never in place) when it is missing,
  longer than `MAX_FILE` bytes, has a NUL or a line that is not two integers, sums to a negative
  number, names other limits than the configured ones, or says "over quota" while it has more
  than one delta line or is older than `STALE_AFTER` seconds (all as Dovecot does, so both sides
  come to the same numbers).
* A delta is appended after the message is durable in `new/` (or after it was unlinked), so a
  crash in between leaves the file low, never high; the periodic recalculation repairs it.
* No limit configured: nothing is read or written (no file is created), like Dovecot without a
  quota rule.

Trust: the file lives in the user's Maildir, which Dovecot (and so the user, through IMAP) may
write too; it is parsed defensively and never larger than `MAX_FILE` bytes is read.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mailhaven.mailbox.owner import MailOwner

#: The file name the Maildir++ specification fixes.
FILE_NAME = "maildirsize"
#: Maildir++ spec: a maildirsize of 5120 bytes or more is recalculated (Dovecot reads 5120).
MAX_FILE = 5120
#: Maildir++ spec / Dovecot MAILDIRSIZE_STALE_SECS: an over-quota file older than this is not
#: believed (mail may have been removed by something that does not update the file).
STALE_AFTER = 15 * 60
#: Size suffixes in configuration values, as in Dovecot's quota_rule: a bare number counts
#: kilobytes (so a rule copied from dovecot.conf means the same here), `B` bytes.
_UNITS = {"": 1024, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE = re.compile(r"\s*(\d+)\s*([KMGT]?B?)\s*", re.IGNORECASE)
_DELTA = re.compile(r"\s*(-?\d+)\s+(-?\d+)\s*")
_NAME_SIZE = re.compile(r",S=(\d+)(?=[:,]|$)")


@dataclass(frozen=True, slots=True)
class Limit:
    """A quota: bytes and messages, 0 meaning unlimited."""

    bytes: int = 0
    messages: int = 0

    @property
    def unlimited(self) -> bool:
        return self.bytes == 0 and self.messages == 0

    def header(self) -> str:
        """The first line of maildirsize, as Dovecot writes it."""
        parts = []
        if self.bytes or not self.messages:
            parts.append(f"{self.bytes}S")
        if self.messages:
            parts.append(f"{self.messages}C")
        return ",".join(parts)


@dataclass(frozen=True, slots=True)
class Usage:
    bytes: int = 0
    messages: int = 0

    def fits(self, limit: Limit, size: int, count: int = 1) -> bool:
        """One more message of `size` bytes stays within `limit` (Dovecot: used + size <=
        limit; a message that would reach the limit exactly still fits)."""
        if limit.bytes and self.bytes + size > limit.bytes:
            return False
        return not (limit.messages and self.messages + count > limit.messages)


@dataclass(frozen=True, slots=True)
class QuotaRules:
    """Which limit applies to a mailbox: the user's own, else its domain's, else the default
    (Dovecot: a userdb quota_rule overrides the global one)."""

    default: Limit = Limit()
    domains: Mapping[str, Limit] = field(default_factory=dict)
    users: Mapping[str, Limit] = field(default_factory=dict)

    @classmethod
    def parse(
        cls, default: str, domains: Mapping[str, str], users: Mapping[str, str]
    ) -> QuotaRules:
        """From configuration strings (already checked by `config.validate`)."""
        return cls(
            parse_rule(default),
            {d.lower().rstrip("."): parse_rule(v) for d, v in domains.items()},
            {u.lower(): parse_rule(v) for u, v in users.items()},
        )

    @property
    def enabled(self) -> bool:
        return not (
            self.default.unlimited
            and all(v.unlimited for v in self.domains.values())
            and all(v.unlimited for v in self.users.values())
        )

    def limit_for(self, mailbox: str, domain: str | None = None) -> Limit:
        """`mailbox` is the user (`alice`, or `alice@a.example` with virtual domains);
        `domain` the recipient's domain when the mailbox name does not carry it. A bare user
        key applies in every domain; `user@domain` wins over it."""
        mailbox = mailbox.lower()
        local, at, in_name = mailbox.rpartition("@")
        if at:
            domain = in_name
        else:
            local = mailbox
        domain = domain.lower().rstrip(".") if domain else None
        # `user@domain` first, then the bare `user`, which (like an alias key without a
        # domain) applies in every local domain
        for key in (f"{local}@{domain}" if domain else None, local):
            if key is not None and key in self.users:
                return self.users[key]
        if domain is not None and domain in self.domains:
            return self.domains[domain]
        return self.default


def parse_size(text: str) -> int:
    """`"100M"`, `"1G"`, `"512B"`, `"5120"` (kilobytes) -> bytes; ValueError otherwise."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (e.g. 500M, 2G, 0 for none)")
    unit = match.group(2).upper()
    return int(match.group(1)) * _UNITS[unit if len(unit) < 2 else unit[0]]


def parse_rule(text: str) -> Limit:
    """A configured quota: `"1G"`, `"storage=1G"`, `"storage=1G messages=5000"`,
    `"messages=100"` (Dovecot's quota_rule words) or `"0"`/`"none"` for no quota."""
    text = text.strip()
    if text.lower() in ("", "none", "noquota"):
        return Limit()
    size = messages = 0
    for word in text.split():
        key, eq, value = word.partition("=")
        if not eq:
            size = parse_size(key)
        elif key.lower() == "storage":
            size = parse_size(value)
        elif key.lower() == "messages" and value.isdigit():
            messages = int(value)
        else:
            raise ValueError(f"not a quota: {text!r} (e.g. \"1G\" or \"storage=1G messages=5000\")")
    return Limit(size, messages)


def parse_header(line: str) -> Limit | None:
    """The first line of maildirsize; None when it is not one."""
    size = messages = 0
    for part in line.split(","):
        part = part.strip()
        if len(part) < 2 or not part[:-1].isdigit() or part[-1] not in "SC":
            return None
        if part[-1] == "S":
            size = int(part[:-1])
        else:
            messages = int(part[:-1])
    return Limit(size, messages)


def read(maildir: Path, limit: Limit, *, now: float | None = None) -> Usage | None:
    """The usage the file states, or None when it must be recalculated (see the module doc)."""
    path = maildir / FILE_NAME
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE)
            mtime = os.fstat(f.fileno()).st_mtime
    except (FileNotFoundError, NotADirectoryError):
        return None
    if len(data) >= MAX_FILE or b"\0" in data:
        return None
    end = data.rfind(b"\n")  # a last line without its LF is still being written: skip it
    if end < 0:
        return None
    try:
        lines = data[:end].decode("ascii").split("\n")
    except UnicodeDecodeError:
        return None
    if parse_header(lines[0]) != limit or len(lines) < 2:
        return None
    used = count = 0
    for line in lines[1:]:
        match = _DELTA.fullmatch(line)
        if match is None:
            return None
        used += int(match.group(1))
        count += int(match.group(2))
    if used < 0 or count < 0:
        return None
    usage = Usage(used, count)
    if not usage.fits(limit, 0, 0):
        stale = mtime < (time.time() if now is None else now) - STALE_AFTER
        if len(lines) > 2 or stale:
            return None
    return usage


def folders(maildir: Path) -> list[Path]:
    """The INBOX and every Maildir++ folder (`.Name` directories) of a Maildir."""
    found = [maildir]
    with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(maildir) as it:
        for entry in it:
            if (
                entry.name.startswith(".")
                and entry.name not in (".", "..")
                and entry.is_dir(follow_symlinks=False)
            ):
                found.append(maildir / entry.name)
    return found


def measure(maildir: Path) -> Usage:
    """Count what is stored: `,S=` sizes where the name has one, else `stat` (Dovecot's
    maildir_sum_dir); files vanishing meanwhile are skipped."""
    used = count = 0
    for folder in folders(maildir):
        for sub in ("new", "cur"):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(
                folder / sub
            ) as it:
                for entry in it:
                    match = _NAME_SIZE.search(entry.name)
                    if match is not None:
                        used += int(match.group(1))
                        count += 1
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        used += entry.stat(follow_symlinks=False).st_size
                        count += 1
    return Usage(used, count)


def recalculate(maildir: Path, limit: Limit, owner: MailOwner | None = None) -> Usage:
    """Measure the Maildir and write a fresh maildirsize (temporary file, then rename), owned
    and moded as the Maildir's files (`owner`), so Dovecot can update it too."""
    usage = measure(maildir)
    text = f"{limit.header()}\n{usage.bytes} {usage.messages}\n".encode("ascii")
    tmp = maildir / f"{FILE_NAME}.{os.getpid()}.{time.monotonic_ns()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        if owner is not None:
            owner.apply_to_fd(fd)
        with open(fd, "wb", closefd=True) as out:
            out.write(text)
        os.rename(tmp, maildir / FILE_NAME)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return usage


def usage(maildir: Path, limit: Limit, owner: MailOwner | None = None) -> Usage:
    """The current usage: the file when it can be trusted, else a recalculation."""
    found = read(maildir, limit)
    return found if found is not None else recalculate(maildir, limit, owner)


def update(
    maildir: Path, limit: Limit, size: int, count: int, owner: MailOwner | None = None
) -> None:
    """Record that `count` messages of `size` bytes in total arrived (negative: left).

    Appends one delta line when the file is trustworthy; otherwise (or when it grew too long)
    recalculates, which already includes the change. No limit: nothing to keep."""
    if limit.unlimited or (size == 0 and count == 0):
        return
    if read(maildir, limit) is None:
        recalculate(maildir, limit, owner)
        return
    try:
        fd = os.open(maildir / FILE_NAME, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    except FileNotFoundError:
        recalculate(maildir, limit, owner)
        return
    try:
        os.write(fd, f"{size} {count}\n".encode("ascii"))
    finally:
        os.close(fd)


def release(maildir: Path, size: int, count: int) -> None:
    """Record that messages left the Maildir (POP3 DELE, expiry): append a negative delta when
    a maildirsize exists, whatever its limit (the next reader with a limit checks the header).
    No file: no quota is kept here, nothing to do."""
    if size == 0 and count == 0:
        return
    try:
        fd = os.open(maildir / FILE_NAME, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        os.write(fd, f"{-size} {-count}\n".encode("ascii"))
    finally:
        os.close(fd)


def stored_size(name: str) -> int | None:
    """The `,S=` size in a Maildir file name, None without one."""
    match = _NAME_SIZE.search(name)
    return int(match.group(1)) if match is not None else None
