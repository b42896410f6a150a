"""sendmail(1) command lines as real callers write them, parsed like Postfix does."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailhaven.cli.sendmail_args import (
    EX_USAGE,
    SendmailArgs,
    UsageError,
    default_mode,
    parse_sendmail_args,
)

BASE = SendmailArgs()

# (caller, argv, the fields that differ from a bare `sendmail`)
CALLERS: list[tuple[str, list[str], dict[str, Any]]] = [
    (
        "PHP mail() default sendmail_path",
        ["-t", "-i"],
        {"recipients_from_headers": True, "ignore_dots": True},
    ),
    (
        "PHP with clustered flags",
        ["-ti"],
        {"recipients_from_headers": True, "ignore_dots": True},
    ),
    (
        "mutt",
        ["-oem", "-oi", "--", "a@b.example"],
        {"ignore_dots": True, "recipients": ("a@b.example",), "ignored": ("-oem",)},
    ),
    (
        "cron (cronie)",
        ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "user"],
        {
            "full_name": "CronDaemon",
            "ignore_dots": True,
            "body_type": "8BITMIME",
            "ignored": ("-oem",),
            "recipients": ("user",),
        },
    ),
    (
        "git send-email",
        ["-i", "-f", "me@x.example", "a@b.example"],
        {"ignore_dots": True, "sender": "me@x.example", "recipients": ("a@b.example",)},
    ),
    (
        "glued sender",
        ["-fme@x.example", "a@b.example"],
        {"sender": "me@x.example", "recipients": ("a@b.example",)},
    ),
    ("-r is -f", ["-r", "me@x.example", "a@b"], {"sender": "me@x.example", "recipients": ("a@b",)}),
    ("null sender glued", ["-f<>", "a@b"], {"sender": "", "recipients": ("a@b",)}),
    ("null sender empty", ["-f", "", "a@b"], {"sender": "", "recipients": ("a@b",)}),
    ("bracketed sender", ["-f", "<me@x>", "a@b"], {"sender": "me@x", "recipients": ("a@b",)}),
    ("named sender", ["-f", "Me <me@x>", "a@b"], {"sender": "me@x", "recipients": ("a@b",)}),
    ("stand-alone SMTP (-bs)", ["-bs"], {"mode": "smtp"}),
    ("separate -b argument", ["-b", "s"], {"mode": "smtp"}),
    ("mailq (-bp)", ["-bp"], {"mode": "mailq"}),
    ("flush (-q)", ["-q"], {"mode": "flush"}),
    ("flush one site", ["-qRexample.org"], {"mode": "flush", "flush_site": "example.org"}),
    ("flush one message", ["-qIABC123"], {"mode": "flush", "flush_queue_id": "ABC123"}),
    ("queue interval alone is a no-op", ["-q1h"], {"mode": "ignore", "queue_interval": "1h"}),
    (
        "classic daemon start",
        ["-bd", "-q30m"],
        {"mode": "daemon", "queue_interval": "30m"},
    ),
    ("newaliases (-bi)", ["-bi"], {"mode": "newaliases"}),
    ("newaliases (-I)", ["-I"], {"mode": "newaliases"}),
    (
        "newaliases with -oA",
        ["-bi", "-oA/etc/aliases"],
        {"mode": "newaliases", "alias_database": "/etc/aliases"},
    ),
    ("host status is ignored", ["-bh"], {"mode": "ignore"}),
    ("verify", ["-bv", "a@b"], {"mode": "verify", "recipients": ("a@b",)}),
    ("explicit deliver", ["-bm", "a@b"], {"recipients": ("a@b",)}),
    (
        "DSN options",
        ["-N", "success, DELAY", "-R", "hdrs", "-V", "env-1", "a@b"],
        {
            "dsn_notify": ("SUCCESS", "DELAY"),
            "dsn_ret": "HDRS",
            "dsn_envid": "env-1",
            "recipients": ("a@b",),
        },
    ),
    ("NOTIFY=NEVER", ["-Nnever", "a@b"], {"dsn_notify": ("NEVER",), "recipients": ("a@b",)}),
    ("RET=FULL", ["-RFULL", "a@b"], {"dsn_ret": "FULL", "recipients": ("a@b",)}),
    ("7bit body", ["-B", "7bit", "a@b"], {"body_type": "7BIT", "recipients": ("a@b",)}),
    (
        "config path",
        ["-C", "/etc/mailhaven", "a@b"],
        {"config_dir": "/etc/mailhaven", "recipients": ("a@b",)},
    ),
    ("one -v", ["-v", "a@b"], {"verbose": 1, "recipients": ("a@b",)}),
    ("two -v", ["-vv", "a@b"], {"verbose": 2, "recipients": ("a@b",)}),
    (
        "historical options are ignored",
        [
            "-L",
            "cron",
            "-O",
            "x=y",
            "-oQ/var/spool",
            "-U",
            "-G",
            "-m",
            "-n",
            "-XV",
            "-h",
            "5",
            "a@b",
        ],
        {
            "ignored": (
                "-L cron",
                "-O x=y",
                "-oQ/var/spool",
                "-U",
                "-G",
                "-m",
                "-n",
                "-XV",
                "-h 5",
            ),
            "recipients": ("a@b",),
        },
    ),
    (
        "options stop at the first recipient",
        ["a@b", "-i", "c@d"],
        {"recipients": ("a@b", "-i", "c@d")},
    ),
    ("-- lets a recipient start with a dash", ["--", "-odd@x"], {"recipients": ("-odd@x",)}),
    (
        "-t with extra recipients",
        ["-t", "a@b"],
        {"recipients_from_headers": True, "recipients": ("a@b",)},
    ),
]


@pytest.mark.parametrize(("caller", "argv", "fields"), CALLERS, ids=[c[0] for c in CALLERS])
def test_real_callers(caller: str, argv: list[str], fields: dict[str, Any]) -> None:
    assert parse_sendmail_args(argv) == replace(BASE, **fields)


# (argv, the message sendmail prints after "sendmail: fatal: ")
USAGE_ERRORS: list[tuple[list[str], str]] = [
    (["-z", "a@b"], "invalid option -- 'z'"),
    (["-tz"], "invalid option -- 'z'"),
    (["-f"], "option requires an argument -- 'f'"),
    (["-i", "-F"], "option requires an argument -- 'F'"),
    (["-bz"], "unsupported: -bz"),
    (["-B", "BINARYMIME", "a@b"], "-B option needs 8BITMIME or 7BIT"),
    (["-R", "most", "a@b"], '-R option needs "full" or "hdrs"'),
    (["-qX"], "-qX is not implemented"),
    (["-qR"], "specify: -qRsitename"),
    (["-qI"], "specify: -qIqueueid"),
    (["-oA"], "-oA requires pathname"),
    (["-bp", "a@b"], "display queue mode requires no recipient"),
    (["-q", "a@b"], "flush queue mode requires no recipient"),
    (["-q", "1h"], "flush queue mode requires no recipient"),  # "-q" alone is not getopt's
    (["-qRexample.org", "a@b"], "flush site requires no recipient"),
    (["-qIABC", "a@b"], "flush queue_id requires no recipient"),
    (["-bs", "a@b"], "stand-alone mode requires no recipient"),
    (["-bi", "a@b"], "alias initialization mode requires no recipient"),
    (["-bd", "a@b"], "daemon mode requires no recipient"),
    (["-bs", "-t"], "-t can be used only in delivery mode"),
    (["-bp", "-qRsite"], "-qR can be used only in delivery mode"),
    (["-bv", "-t"], "-t option cannot be used with -bv"),
    (["-bv", "-Nnever", "a@b"], "-N option cannot be used with -bv"),
    (["-bv", "-v", "a@b"], "-v option cannot be used with -bv"),
    ([], "Recipient addresses must be specified on the command line or via the -t option"),
    (["-i"], "Recipient addresses must be specified on the command line or via the -t option"),
    (
        ["-f", "a\r\nRCPT TO:<x>", "a@b"],
        "-f option specified malformed sender: 'a\\r\\nRCPT TO:<x>'",
    ),
]


@pytest.mark.parametrize(("argv", "message"), USAGE_ERRORS)
def test_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_sendmail_args(argv)
    assert str(info.value) == message


def test_exit_code_is_ex_usage() -> None:
    assert EX_USAGE == 64


def test_bad_notify_is_a_warning_not_an_error() -> None:
    args = parse_sendmail_args(["-N", "sometimes", "a@b"])
    assert args.dsn_notify == ()
    assert args.warnings == ("bad -N option value -- ignored",)
    args = parse_sendmail_args(["-N", "never,success", "a@b"])
    assert args.dsn_notify == ()


def test_bad_envid_is_a_warning_not_an_error() -> None:
    assert parse_sendmail_args(["-V", "x" * 101, "a@b"]).warnings == (
        "too long -V option value -- ignored",
    )
    args = parse_sendmail_args(["-V", "a\tb", "a@b"])
    assert args.dsn_envid is None
    assert args.warnings == ("bad syntax in -V option value -- ignored",)
    assert parse_sendmail_args(["-V", "x" * 100, "a@b"]).dsn_envid == "x" * 100


def test_q_then_bd_warns_and_stays_daemon() -> None:
    args = parse_sendmail_args(["-q", "-bd"])
    assert args.mode == "daemon"
    assert args.warnings == ("ignoring -q option in daemon mode",)


def test_last_mode_option_wins() -> None:
    assert parse_sendmail_args(["-bp", "-bs"]).mode == "smtp"
    assert parse_sendmail_args(["-q", "-bm", "a@b"]).mode == "deliver"


@pytest.mark.parametrize(
    ("prog", "mode"),
    [("sendmail", "deliver"), ("/usr/bin/mailq", "mailq"), ("newaliases", "newaliases")],
)
def test_program_name_sets_default_mode(prog: str, mode: str) -> None:
    assert default_mode(prog) == mode
    assert parse_sendmail_args(["-t"] if mode == "deliver" else [], prog=prog).mode == mode


def test_mailq_name_overridden_by_option() -> None:
    assert parse_sendmail_args(["-bs"], prog="mailq").mode == "smtp"


def test_control_characters_in_full_name_are_refused() -> None:
    with pytest.raises(UsageError):
        parse_sendmail_args(["-F", "Evil\nBcc: x@y", "a@b"])


def test_utf8_full_name_is_fine() -> None:
    assert parse_sendmail_args(["-F", "Jörg", "a@b"]).full_name == "Jörg"


def test_module_imports_nothing_heavy() -> None:
    import mailhaven.cli.sendmail_args as module

    source = Path(module.__file__).read_text(encoding="utf-8")
    imports = {
        line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))
    }
    assert imports <= {"__future__", "dataclasses", "typing"}


@given(st.lists(st.text(max_size=12), max_size=8))
def test_any_argv_parses_or_raises_usage_error(argv: list[str]) -> None:
    try:
        args = parse_sendmail_args(argv)
    except UsageError:
        return
    assert isinstance(args, SendmailArgs)
