"""`mailhaven user add|passwd|delete|list`: manage the passwd-file of mailbox users.

Users are full addresses at a local domain (`mailhaven user add alice@a.example`); with one
local domain a bare name means that domain (`user add alice` adds `alice@<domain>`). `user list
--domain D` lists one domain's users. A new user's domain must be a local domain.

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
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from mailhaven.mailbox.layout import normalize_domain, split_name
from mailhaven.mailbox.users import UserDB, UserDBError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailhaven user", description="manage mailbox users")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("add", help="add a user (password from the terminal or stdin)").add_argument(
        "name")
    sub.add_parser("passwd", help="change a user's password").add_argument("name")
    sub.add_parser("delete", help="delete a user (the Maildir is kept)").add_argument("name")
    listing = sub.add_parser("list", help="list users (full addresses)")
    listing.add_argument("--domain", help="only the users of this domain")
    return parser


def _by_domain(name: str) -> tuple[str, str]:
    local, domain = split_name(name)
    return domain or "", local


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
    domains: Sequence[str] = (),
    file_mode: int | None = None,
    file_group: int | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on usage errors and --help
        return int(exc.code or 0)
    db = UserDB(users_file, domains=domains, file_mode=file_mode, file_group=file_group)
    try:
        match args.command:
            case "add":
                name = db.add(args.name, _read_password(stdin))
                print(f"user {name} added", file=stdout)
            case "passwd":
                found = db.resolve(args.name)
                if found is None:
                    raise UserDBError(f"no such user: {args.name[:80]}")
                db.set_password(found, _read_password(stdin))
                print(f"password changed for {found}", file=stdout)
            case "delete":
                name = db.delete(args.name)
                print(f"user {name} deleted", file=stdout)
            case "list":
                domain = normalize_domain(args.domain) if args.domain is not None else None
                if args.domain is not None and domain is None:
                    raise UserDBError(f"invalid domain: {args.domain[:80]!r}")
                for name in sorted(db.names(), key=_by_domain):
                    if domain is None or split_name(name)[1] == domain:
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
