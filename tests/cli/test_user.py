"""`mailhaven user add|passwd|delete|list` as a function of argv."""

from __future__ import annotations

import io
from pathlib import Path

from mailhaven.cli.user import main
from mailhaven.mailbox.users import UserDB


def run(path: Path, *argv: str, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), users_file=path, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


async def test_user_lifecycle(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    assert run(path, "add", "Alice", stdin="s3cret pass\n")[:2] == (0, "user alice added\n")
    assert run(path, "add", "bob", stdin="pw\n")[0] == 0
    assert run(path, "list") == (0, "alice\nbob\n", "")
    assert await UserDB(path).verify("alice", "s3cret pass")
    assert run(path, "passwd", "alice", stdin="other\n")[0] == 0
    assert await UserDB(path).verify("alice", "other")
    assert run(path, "delete", "bob")[0] == 0
    assert run(path, "list")[1] == "alice\n"


def test_refusals(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    run(path, "add", "alice", stdin="pw\n")
    assert run(path, "add", "alice", stdin="pw\n")[0] == 1
    assert run(path, "add", "x/y", stdin="pw\n")[0] == 1
    assert run(path, "add", "carol", stdin="\n")[0] == 1
    code, _, err = run(path, "passwd", "zed", stdin="pw\n")
    assert code == 1 and "no such user" in err
    assert run(path, "delete", "zed")[0] == 1
    assert run(path, "frobnicate")[0] == 2
    assert run(path)[0] == 2
