"""The upgrade of `mail/<user>/` to `mail/<domain>/<user>/`: complete, logged, crash-safe."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from mailhaven.mailbox import migrate as mg
from mailhaven.mailbox.maildir import UniqueNames, deliver
from mailhaven.mailbox.users import UserDB

FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def legacy(root: Path, users: dict[str, int]) -> dict[str, set[bytes]]:
    """Old-layout Maildirs with `count` messages each; what each holds."""
    names = UniqueNames("h")
    held: dict[str, set[bytes]] = {}
    for user, count in users.items():
        held[user] = set()
        for i in range(count):
            body = f"Subject: {user} {i}\r\n\r\nhi\r\n".encode()
            deliver(root / user, [body], names=names)
            held[user].add(body.replace(b"\r\n", b"\n"))
    return held


def contents(maildir: Path) -> list[bytes]:
    return sorted(p.read_bytes() for sub in ("new", "cur") for p in (maildir / sub).iterdir())


def users_file(path: Path, *names: str) -> UserDB:
    path.write_text("".join(f"{n}:{{ARGON2ID}}{FAST.hash('pw')}:::::\n" for n in names))
    return UserDB(path, hasher=FAST, domains=["localhost", "b.example"])


def test_migration_moves_every_maildir_and_qualifies_users(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "mail"
    held = legacy(root, {"alice": 3, "bob": 1, "new": 1})
    db = users_file(tmp_path / "passwd", "alice", "bob")
    (root / "stray-file").write_text("x")
    caplog.set_level(logging.INFO, "mailhaven")
    report = mg.migrate(root, db, ["localhost", "b.example"])
    assert sorted(report.moved) == ["alice", "bob", "new"] and report.qualified == ["alice", "bob"]
    for user, bodies in held.items():
        assert not (root / user).exists()
        assert sorted(bodies) == contents(root / "localhost" / user)
    assert db.names() == {"alice@localhost", "bob@localhost"}
    assert (root / mg.MARKER).read_text() == mg.LAYOUT_VERSION
    assert (root / "b.example").is_dir() and (root / "stray-file").exists()
    assert "moved to" in caplog.text and "is now alice@localhost" in caplog.text
    again = mg.migrate(root, db, ["localhost", "b.example"])  # idempotent
    assert (again.moved, again.qualified) == ([], [])


def test_merge_into_an_existing_maildir_never_overwrites(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    legacy(root, {"alice": 2})
    newer = legacy(root / "localhost", {"alice": 1})
    clash = next((root / "alice" / "new").iterdir())
    (root / "localhost" / "alice" / "new" / clash.name).write_bytes(b"other\n")
    report = mg.migrate(root, users_file(tmp_path / "passwd"), ["localhost"])
    got = contents(root / "localhost" / "alice")
    assert b"other\n" in got and set(newer["alice"]) <= set(got)
    assert len(got) == 3  # the clashing one is left behind, logged, not lost
    assert report.left == [str(clash)] and clash.exists()


def test_a_local_domain_or_bad_name_is_not_moved(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    legacy(root, {"localhost": 1})
    (root / "x%y" / "new").mkdir(parents=True)
    for sub in ("cur", "tmp"):
        (root / "x%y" / sub).mkdir()
    report = mg.migrate(root, users_file(tmp_path / "passwd"), ["localhost"])
    assert report.moved == [] and (root / "x%y").is_dir()


def test_parked_domains_are_the_directories_of_domains(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    legacy(root, {"alice": 1})
    (root / "gone.example" / "bob").mkdir(parents=True)
    assert mg.mail_domains(root) == ["gone.example"]  # a legacy Maildir is no domain


KILLER = """
import os, signal, sys
from pathlib import Path
from mailhaven.mailbox import migrate as mg
from mailhaven.mailbox.users import UserDB
moved = []
def checkpoint(user):
    moved.append(user)
    if len(moved) == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
mg.migrate(Path(sys.argv[1]), UserDB(Path(sys.argv[2]), domains=["localhost"]), ["localhost"],
           checkpoint=checkpoint)
"""


@pytest.mark.parametrize("after", [1, 3, 5])
def test_kill_9_during_migration_then_restart_completes_it(tmp_path: Path, after: int) -> None:
    root = tmp_path / "mail"
    held = legacy(root, {f"user{i}": 2 for i in range(6)})
    users_file(tmp_path / "passwd", *held)
    proc = subprocess.run([sys.executable, "-c", KILLER, str(root), str(tmp_path / "passwd"),
                           str(after)], capture_output=True, timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (root / mg.MARKER).exists()
    moved = sorted(p.name for p in (root / "localhost").iterdir())
    assert len(moved) == after  # killed half-way: some moved, the rest not yet
    report = mg.migrate(root, UserDB(tmp_path / "passwd", domains=["localhost"]), ["localhost"])
    assert len(report.moved) == len(held) - after
    for user, bodies in held.items():
        assert contents(root / "localhost" / user) == sorted(bodies), user  # once, none lost
        assert not (root / user).exists()
    assert (root / mg.MARKER).exists()
    assert sorted(os.listdir(root)) == [".layout", "localhost"]  # nothing else appeared


@pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")
def test_existing_maildirs_are_handed_to_a_new_mail_owner(tmp_path: Path) -> None:
    import grp
    import pwd
    import stat

    from mailhaven.mailbox.owner import MailOwner

    root = tmp_path / "mail"
    legacy(root, {"alice": 2})  # root's, 0700/0600, as before mail_user was set
    uid, gid = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    owner = MailOwner(uid, gid, 0o770, 0o660)
    mg.migrate(root, users_file(tmp_path / "passwd"), ["localhost"], owner)
    box = root / "localhost" / "alice"
    for path in [box, *box.rglob("*")]:
        st = path.lstat()
        mode = 0o770 if path.is_dir() else 0o660
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, mode), path
