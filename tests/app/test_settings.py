"""app.settings: the mailbox names every local delivery checks."""

from __future__ import annotations

import os
from pathlib import Path

from argon2 import PasswordHasher

from mailhaven.app.settings import mailbox_names
from mailhaven.config import Config
from mailhaven.mailbox.users import UserDB

FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def test_mailbox_names_are_local_users_and_the_users_file_as_of_the_call(
    tmp_path: Path,
) -> None:
    config = Config(state_dir=str(tmp_path / "state"), local_domains=("example.org",),
                    local_users=("Postmaster", "ops@example.org"))
    users = UserDB(tmp_path / "passwd", hasher=FAST, domains=("example.org",))
    users.add("alice@example.org", "pw")
    names = mailbox_names(config, users)
    before = names()
    assert "postmaster@example.org" in before and "alice@example.org" in before
    assert "ops@example.org" in before and "bob@example.org" not in before
    assert sorted(before) == ["alice@example.org", "ops@example.org", "postmaster@example.org"]
    assert len(before) == 3
    other = UserDB(users.path, hasher=FAST, domains=("example.org",))  # `mailhaven user add`
    other.add("bob@example.org", "pw")
    os.utime(users.path, ns=(0, 10**18))  # a change the mtime check cannot miss
    after = names()
    assert "bob@example.org" in after and len(after) == 4
    assert "bob@example.org" not in before  # a snapshot: a reload replaces, never edits
