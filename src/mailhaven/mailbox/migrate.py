"""The upgrade to virtual domains: `mail/<user>/` becomes `mail/<domain>/<user>/`, once.

Role: run at start-up, before anything delivers or reads mail, to bring a mail root and a users
file written before virtual domains into the current layout (see `mailbox.layout`):

1. bare names in the users file become `<name>@<primary domain>` (`UserDB.qualify_bare_names`,
   an atomic rewrite under the file's lock), so Dovecot finds them by full address;
2. each legacy Maildir `mail/<user>/` (a directory with `cur/`, `new/` and `tmp/` whose name is
   not a local domain) moves to `mail/<primary>/<user>/` with one `rename(2)`;
3. every local domain gets its directory (so a domain later removed from the configuration is
   still known as one: `parked_domains`), and the marker `mail/.layout` records that the mail
   root is in the new layout, so later starts do not look for legacy Maildirs again;
4. with a mail owner configured (and running as root), Maildirs that are not the owner's yet
   (made before it was set) are handed to it whole, once, and logged.

Crash safety: each step is atomic on its own and the whole is idempotent. A move is one rename
within the file system, so after `kill -9` a Maildir is either still at its old place (the next
start moves it) or at its new one, never half of each, and no message exists twice. Directory
entries are fsync'd after each move and before the marker is written. If the new place already
exists (mail was delivered there by a newer version before this ran), the old Maildir is merged
file by file, again by rename; a name present in both is left in the old place and logged, never
overwritten. Every move is logged on `mailhaven.mailbox`.

SECURITY: names come from a directory listing of our own mail root; only names that are valid
local parts are moved, and nothing follows a symbolic link (a link is not a Maildir here).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mailhaven.mailbox.layout import normalize_domain, normalize_local
from mailhaven.mailbox.owner import MailOwner
from mailhaven.mailbox.users import UserDB

log = logging.getLogger("mailhaven.mailbox")

#: Written once the mail root is in the `<domain>/<user>` layout (its content: the version).
MARKER = ".layout"
LAYOUT_VERSION = "domain/user 1\n"
_MAILDIR_SUBDIRS = ("cur", "new", "tmp")


@dataclass
class Report:
    qualified: list[str] = field(default_factory=list)  # users file names given a domain
    moved: list[str] = field(default_factory=list)  # legacy Maildirs moved
    left: list[str] = field(default_factory=list)  # entries that could not be moved


def migrate(
    mail_root: Path,
    users: UserDB,
    domains: Iterable[str],
    owner: MailOwner | None = None,
    *,
    checkpoint: Callable[[str], None] = lambda _step: None,
) -> Report:
    """Bring `mail_root` and the users file into the virtual-domain layout (idempotent).
    `checkpoint` is called after each move (the crash tests kill the process there)."""
    local = [d for d in (normalize_domain(x) for x in domains) if d is not None]
    if not local:
        raise ValueError("migration needs at least one local domain")
    primary = local[0]
    report = Report()
    report.qualified = users.qualify_bare_names()
    for name in report.qualified:
        log.warning("users file %s: user %s is now %s@%s", users.path, name, name, primary)
    mail_root.mkdir(parents=True, exist_ok=True)
    if not (mail_root / MARKER).exists():
        for entry in _legacy_maildirs(mail_root, set(local)):
            _move(mail_root, entry, primary, owner, report)
            checkpoint(entry)
    for domain in local:
        _ensure_dir(mail_root / domain, owner)
    if owner is not None and os.geteuid() == 0 and (owner.uid, owner.gid) != (-1, -1):
        for domain in local:
            _hand_over(mail_root / domain, owner)
    if not (mail_root / MARKER).exists():
        _fsync_dir(mail_root)
        _write_marker(mail_root)
        log.info("mail root %s: layout <domain>/<user> (%d mailboxes moved)", mail_root,
                 len(report.moved))
    return report


def mail_domains(mail_root: Path) -> list[str]:
    """The domains that have a directory in the mail root (for `parked_domains`)."""
    try:
        entries = sorted(os.scandir(mail_root), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    return [
        e.name for e in entries
        if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)
        and normalize_domain(e.name) == e.name and not _is_maildir(Path(e.path))
    ]


def _legacy_maildirs(mail_root: Path, local: set[str]) -> list[str]:
    out = []
    for entry in sorted(os.scandir(mail_root), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        if not _is_maildir(Path(entry.path)):
            continue
        if entry.name in local:
            log.error("mail root %s: %s is a local domain and looks like a Maildir; not moved",
                      mail_root, entry.name)
            continue
        if normalize_local(entry.name) != entry.name:
            log.error("mail root %s: %s is not a valid user name; not moved", mail_root,
                      entry.name)
            continue
        out.append(entry.name)
    return out


def _hand_over(domain_dir: Path, owner: MailOwner) -> None:
    """Maildirs made before `mail_user`/`mail_group` were set (root's, 0700/0600) become the
    mail user's, whole and once (a Maildir whose top already is the owner's is skipped), so
    Dovecot can open them; logged. Symbolic links are neither followed nor changed."""
    for entry in sorted(os.scandir(domain_dir), key=lambda e: e.name):
        if not entry.is_dir(follow_symlinks=False):
            continue
        st = entry.stat(follow_symlinks=False)
        wanted = (owner.uid if owner.uid != -1 else st.st_uid,
                  owner.gid if owner.gid != -1 else st.st_gid)
        if (st.st_uid, st.st_gid) == wanted:
            continue
        log.warning("mailbox %s: handing it to the mail user (uid %d, gid %d)", entry.path,
                    *wanted)
        for root, dirs, files in os.walk(entry.path):
            for name in dirs:
                if not os.path.islink(os.path.join(root, name)):
                    owner.apply_to_dir(Path(root, name))
            for name in files:
                path = os.path.join(root, name)
                if not os.path.islink(path):
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    try:
                        owner.apply_to_fd(fd)
                    finally:
                        os.close(fd)
        owner.apply_to_dir(Path(entry.path))  # last: its owner says the walk is complete


def _is_maildir(path: Path) -> bool:
    return all((path / sub).is_dir() and not (path / sub).is_symlink() for sub in _MAILDIR_SUBDIRS)


def _move(mail_root: Path, user: str, primary: str, owner: MailOwner | None,
          report: Report) -> None:
    source, domain_dir = mail_root / user, mail_root / primary
    target = domain_dir / user
    _ensure_dir(domain_dir, owner)
    try:
        os.rename(source, target)  # atomic; fails if target is a non-empty directory
    except OSError:
        if not target.is_dir():
            raise
        _merge(source, target, report)
    else:
        _fsync_dir(domain_dir)
        _fsync_dir(mail_root)
    report.moved.append(user)
    log.warning("mailbox %s moved to %s (virtual domains layout)", source, target)


def _merge(source: Path, target: Path, report: Report) -> None:
    """Move what `source` holds into the existing `target`, entry by entry, never replacing."""
    for sub in _MAILDIR_SUBDIRS:
        (target / sub).mkdir(exist_ok=True)
        for name in sorted(os.listdir(source / sub)):
            _move_entry(source / sub / name, target / sub / name, report)
        _fsync_dir(target / sub)
    for name in sorted(os.listdir(source)):
        if name not in _MAILDIR_SUBDIRS:
            _move_entry(source / name, target / name, report)
    _fsync_dir(target)
    for sub in _MAILDIR_SUBDIRS:
        _rmdir_if_empty(source / sub)
    _rmdir_if_empty(source)


def _move_entry(source: Path, target: Path, report: Report) -> None:
    if target.exists() or target.is_symlink():
        report.left.append(str(source))
        log.error("mailbox migration: %s exists already; %s left in place", target, source)
        return
    os.rename(source, target)


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        if path.exists():
            log.error("mailbox migration: %s is not empty; left in place", path)


def _ensure_dir(path: Path, owner: MailOwner | None) -> None:
    try:
        os.mkdir(path, owner.dir_mode if owner else 0o700)
    except FileExistsError:
        return
    if owner is not None:
        owner.apply_to_dir(path)
    _fsync_dir(path.parent)


def _write_marker(mail_root: Path) -> None:
    tmp = mail_root / f"{MARKER}.tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(LAYOUT_VERSION)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, mail_root / MARKER)
    _fsync_dir(mail_root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
