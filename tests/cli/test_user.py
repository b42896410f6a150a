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
def run_domains(path: Path, *argv: str, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), users_file=path, domains=["a.example", "b.example"],
                stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


async def test_users_per_domain(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    assert run_domains(path, "add", "Alice@A.Example", stdin="pw\n")[:2] == (
        0, "user alice@a.example added\n")
    assert run_domains(path, "add", "alice@b.example", stdin="pw2\n")[0] == 0
    assert run_domains(path, "add", "bob@b.example", stdin="pw3\n")[0] == 0
    assert run_domains(path, "list")[1] == "alice@a.example\nalice@b.example\nbob@b.example\n"
    assert run_domains(path, "list", "--domain", "B.EXAMPLE")[1] == "alice@b.example\nbob@b.example\n"
    code, _, err = run_domains(path, "add", "carol", stdin="pw\n")
    assert code == 1 and "full address" in err
    code, _, err = run_domains(path, "add", "carol@elsewhere.example", stdin="pw\n")
    assert code == 1 and "not a local domain" in err
    assert run_domains(path, "list", "--domain", "../x")[0] == 1
    assert run_domains(path, "passwd", "ALICE@b.example", stdin="new\n")[:2] == (
        0, "password changed for alice@b.example\n")
    assert await UserDB(path, domains=["a.example", "b.example"]).verify("alice@b.example", "new")
    assert run_domains(path, "delete", "bob@b.example")[1] == "user bob@b.example deleted\n"
