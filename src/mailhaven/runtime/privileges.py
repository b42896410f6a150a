"""Running as the service user: who it is, handing it the state directory, dropping to it.

Started as root with `user` set, the daemon binds every listening socket first (ports below
1024), then hands the state directory to the user and drops to it (`drop`) before it opens the
spool, loads keys or users, or accepts a connection: everything the daemon creates from then on
(spool, Maildir files, self-signed key, control socket) is the user's by construction, and the
worker processes it spawns inherit the user's identity. Dropping before the spool is opened,
rather than chowning what root made, leaves no window in which a file is root's and no list of
files to keep in step with the code.

Started as any other user, nothing changes (ports >= 1024, or sockets from systemd).

SECURITY: the order is initgroups (supplementary groups), setgid, setuid: after setuid we could
no longer change groups. `drop` checks that root cannot be regained. The hand-over chowns without
following symbolic links, so a link planted in the state directory cannot give the user a file
outside it.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from mailhaven.runtime import logtargets

log = logging.getLogger("mailhaven.master")

#: Modes `mailhaven config check` expects at most (bits beyond them draw a warning): private
#: keys are the service user's alone; its group may enter the state directory (as start-up
#: makes it) and read the users file; other users get nothing.
STATE_DIR_MODE = 0o750
KEY_MODE = 0o600
USERS_FILE_MODE = 0o640


@dataclass(frozen=True)
class Identity:
    """The service user to run as: its name (for initgroups), uid and gid."""

    name: str
    uid: int
    gid: int


def resolve(user: str, group: str = "") -> Identity:
    """The account named by the `user` (and `group`) settings; LookupError says what is wrong."""
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        raise LookupError(f"user: no such user {user!r} (create it first)") from None
    if account.pw_uid == 0:
        raise LookupError(f"user: {user!r} is root; name an unprivileged user")
    gid = account.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise LookupError(f"group: no such group {group!r}") from None
        if gid == 0:
            raise LookupError(f"group: {group!r} is root's group; name an unprivileged one")
    return Identity(user, account.pw_uid, gid)


def hand_over(state_dir: Path, who: Identity) -> None:
    """Make `state_dir` the user's (created mode 0750 if absent). A tree that is not the user's
    yet (a previous run as root) is chowned whole, once, and logged."""
    state_dir.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
    top = state_dir.lstat()
    if (top.st_uid, top.st_gid) == (who.uid, who.gid):
        return
    log.warning("state directory %s: handing it to user %s", state_dir, who.name)
    os.chown(state_dir, who.uid, who.gid, follow_symlinks=False)
    for root, dirs, files in os.walk(state_dir):
        for name in (*dirs, *files):
            os.chown(os.path.join(root, name), who.uid, who.gid, follow_symlinks=False)


def drop(who: Identity) -> None:
    """Become `who` for good: supplementary groups, group, then user."""
    os.initgroups(who.name, who.gid)
    os.setgid(who.gid)
    os.setuid(who.uid)
    try:
        os.setuid(0)
    except PermissionError:
        log.info("running as user %s (uid %d, gid %d)", who.name, who.uid, who.gid)
        return
    raise RuntimeError(f"could still regain root after dropping to {who.name}")


def become(user: str, group: str, state_dir: Path, log_target: str = "stderr") -> None:
    """The daemon, after binding its sockets: when started as root with `user` set, hand
    `state_dir` (and a `file:` log target, opened already: the user reopens it on SIGUSR1) over
    and become the user; as root without `user`, say so; as anyone else, nothing. OSError names a
    user or group that does not exist."""
    if os.geteuid() != 0:
        return
    if not user:
        log.warning("running as root: set `user` to run as an unprivileged account")
        return
    try:
        who = resolve(user, group)
    except LookupError as err:
        raise OSError(str(err)) from None
    hand_over(state_dir, who)
    kind, where = logtargets.parse(log_target)
    if kind == "file":
        with contextlib.suppress(OSError):
            os.chown(where, who.uid, who.gid)
    drop(who)


def loose_modes(state_dir: Path, keys: list[Path], users_file: Path) -> list[str]:
    """What `config check` warns about: files that exist and are more open than they should."""
    wanted = [(state_dir, STATE_DIR_MODE, "state directory")]
    wanted += [(key, KEY_MODE, "private key") for key in keys]
    wanted.append((users_file, USERS_FILE_MODE, "users file"))
    out = []
    for path, most, what in wanted:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError:
            continue  # absent (made at first start) or unreadable: start-up says so
        if mode & ~most:
            out.append(f"{what} {path} has mode {mode:04o}; expected at most {most:04o}")
    return out
