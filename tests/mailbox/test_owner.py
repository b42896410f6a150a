"""Maildir owner and modes: what delivery creates is the mail user's, as configured."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mailhaven.mailbox.maildir import UniqueNames, deliver, mailbox_path
from mailhaven.mailbox.owner import MailOwner, resolve_owner

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")


def nobody() -> tuple[int, int]:
    return pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid


@root_only
def test_deliveries_belong_to_the_mail_user(tmp_path: Path) -> None:
    uid, gid = nobody()
    owner = resolve_owner("nobody", "nogroup", 0o770, 0o660)
    assert owner == MailOwner(uid, gid, 0o770, 0o660)
    old = os.umask(0o077)  # modes are set explicitly: a strict umask does not narrow them
    try:
        box = mailbox_path(tmp_path / "mail", "alice@a.example")
        path = deliver(box, [b"Subject: x\r\n\r\nhi\r\n"], names=UniqueNames("h"), owner=owner)
    finally:
        os.umask(old)
    for d in (box.parent, box, box / "new", box / "cur", box / "tmp"):
        st = d.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, 0o770), d
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, 0o660)


def test_unknown_or_root_owner_is_refused() -> None:
    with pytest.raises(LookupError, match="no such user"):
        resolve_owner("no-such-user-h7")
    with pytest.raises(LookupError, match="root"):
        resolve_owner("root")
    with pytest.raises(LookupError, match="no such group"):
        resolve_owner("", "no-such-group-h7")


@root_only
def test_an_unprivileged_daemon_sets_the_group_it_is_in() -> None:
    """Dropped to `nobody` (a member of nogroup only through its primary group), delivery
    gives files the mail group and the modes, and cannot give them to another owner."""
    uid, gid = nobody()
    top = Path(tempfile.mkdtemp(prefix="mailhaven-owner-"))  # pytest's tree is root's 0700
    try:
        os.chown(top, uid, gid)
        _deliver_as(top, uid, gid)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _deliver_as(tmp_path: Path, uid: int, gid: int) -> None:
    script = (
        "import os, sys; from pathlib import Path\n"
        "from mailhaven.mailbox.maildir import UniqueNames, deliver\n"
        "from mailhaven.mailbox.owner import MailOwner\n"
        f"os.setgroups([]); os.setgid({gid}); os.setuid({uid})\n"  # as the daemon drops
        f"owner = MailOwner(0, {gid}, 0o770, 0o660)\n"  # uid 0 is ignored without root
        "p = deliver(Path(sys.argv[1]) / 'a.example' / 'alice', [b'x\\r\\n'],"
        " names=UniqueNames('h'), owner=owner)\n"
        "print(p)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)],
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    st = Path(out.stdout.strip()).stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, 0o660)
