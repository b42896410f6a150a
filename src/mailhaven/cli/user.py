"""`mailhaven user add|passwd|delete|list`: manage the passwd-file of mailbox users.

In: an argv list (without the `user` word) and the users file path. Out: an exit status,
0 on success, 1 when the operation is refused (exists, no such user, invalid name, empty or
mismatched password), 2 on usage errors (argparse's convention).

Passwords are never taken from argv (it is visible in `ps`): they come from a terminal prompt
(asked twice) or, when stdin is not a terminal, from its first line (`echo pw | mailhaven user
add bob`). The running server sees changes without a restart (`UserDB` reloads on mtime).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import TextIO

from mailhaven.mailbox.users import UserDB, UserDBError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailhaven user", description="manage mailbox users")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("add", help="add a user (password from the terminal or stdin)").add_argument(
        "name")
    sub.add_parser("passwd", help="change a user's password").add_argument("name")
    sub.add_parser("delete", help="delete a user (the Maildir is kept)").add_argument("name")
    sub.add_parser("list", help="list user names")
    return parser


def _read_password(stdin: TextIO) -> str:
    if stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            raise UserDBError("passwords do not match")
        return first
    return stdin.readline().rstrip("\r\n")


def main(
    argv: list[str],
    *,
    users_file: Path,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on usage errors and --help
        return int(exc.code or 0)
    db = UserDB(users_file)
    try:
        match args.command:
            case "add":
                name = db.add(args.name, _read_password(stdin))
                print(f"user {name} added", file=stdout)
            case "passwd":
                if args.name.strip().lower() not in db.names():
                    raise UserDBError(f"no such user: {args.name}")
                db.set_password(args.name, _read_password(stdin))
                print(f"password changed for {args.name.lower()}", file=stdout)
            case "delete":
                db.delete(args.name)
                print(f"user {args.name.lower()} deleted", file=stdout)
            case "list":
                for name in sorted(db.names()):
                    print(name, file=stdout)
            case other:
                raise AssertionError(other)
    except UserDBError as exc:
        print(f"mailhaven user: {exc}", file=stderr)
        return 1
    except OSError as exc:
        print(f"mailhaven user: {users_file}: {exc.strerror}", file=stderr)
        return 1
    return 0
