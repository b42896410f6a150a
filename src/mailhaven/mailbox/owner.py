"""Who owns the Maildirs, and with which modes: so another program (Dovecot) can share them.

Role: the `[mailbox] mail_user`, `mail_group`, `dir_mode` and `file_mode` settings, resolved once
into numbers (`MailOwner`), and the two operations that apply them to what delivery creates: a
new message file (by descriptor, before it is linked into `new/`, so no reader ever sees it with
the wrong owner) and a new directory.

Rules (what a sysadmin expects from Postfix's virtual(8) with `virtual_uid_maps`):
* Running as root, files and directories are given `mail_user`/`mail_group` (e.g. `vmail`).
* Running as an unprivileged user, the owner is that user by construction; the group is
  `mail_group` when the user is a member of it (chgrp needs no privilege then), else its own.
* Modes are set explicitly with fchmod/chmod, never through the umask, so `0660` / `0770` give
  the group what they say. The defaults (0600 / 0700) keep a mailbox private to its owner.

In: numbers or names. Out: `MailOwner`, or `LookupError` naming what does not exist.
SECURITY: a mode may not give anything to "other" (checked in the configuration), and the
owner may not be root (Dovecot refuses uid 0 for mail, and mail must not be root's to write).
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

#: Mailboxes are private to their owner unless the configuration shares them with a group.
DIR_MODE = 0o700
FILE_MODE = 0o600


@dataclass(frozen=True, slots=True)
class MailOwner:
    """Owner (-1: leave as created), group (-1: likewise) and modes for new mail files."""

    uid: int = -1
    gid: int = -1
    dir_mode: int = DIR_MODE
    file_mode: int = FILE_MODE

    def _ids(self, current_uid: int, current_gid: int) -> tuple[int, int]:
        """What to chown to (-1: keep), as far as this process may."""
        uid = self.uid if os.geteuid() == 0 and self.uid not in (-1, current_uid) else -1
        gid = self.gid if self.gid not in (-1, current_gid) else -1
        if gid != -1 and os.geteuid() != 0 and gid not in (os.getegid(), *os.getgroups()):
            gid = -1  # not a member: chgrp would fail, and the file stays usable by us
        return uid, gid

    def apply_to_fd(self, fd: int) -> None:
        """Owner and mode of a file we just created (still in `tmp/`)."""
        st = os.fstat(fd)
        uid, gid = self._ids(st.st_uid, st.st_gid)
        if (uid, gid) != (-1, -1):
            os.fchown(fd, uid, gid)
        if st.st_mode & 0o7777 != self.file_mode:
            os.fchmod(fd, self.file_mode)

    def apply_to_dir(self, path: Path) -> None:
        """Owner and mode of a directory we just created (never follows a symlink)."""
        st = os.lstat(path)
        uid, gid = self._ids(st.st_uid, st.st_gid)
        if (uid, gid) != (-1, -1):
            os.chown(path, uid, gid, follow_symlinks=False)
        if st.st_mode & 0o7777 != self.dir_mode:
            os.chmod(path, self.dir_mode)


def resolve_owner(
    user: str = "", group: str = "", dir_mode: int = DIR_MODE, file_mode: int = FILE_MODE
) -> MailOwner:
    """The `MailOwner` the settings name; LookupError when a name does not exist or is root.
    A user without a group means the user's own group (as `chown user:`)."""
    uid = gid = -1
    if user:
        try:
            account = pwd.getpwnam(user)
        except KeyError:
            raise LookupError(f"mail_user: no such user {user!r}") from None
        if account.pw_uid == 0:
            raise LookupError(f"mail_user: {user!r} is root; name an unprivileged user")
        uid, gid = account.pw_uid, account.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise LookupError(f"mail_group: no such group {group!r}") from None
    return MailOwner(uid, gid, dir_mode, file_mode)


def group_id(group: str) -> int | None:
    """The gid of `group` (for `users_file_group`); None for "" (keep the file's group)."""
    if not group:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise LookupError(f"users_file_group: no such group {group!r}") from None
