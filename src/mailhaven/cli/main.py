"""The `mailhaven` command: `serve`, `config check`, `user ...` (more roles add their words).

`mailhaven sendmail ...`, `mailhaven mailq` and `mailhaven queue ...` are handed to their own
parsers before argparse sees them (sendmail's flags are not argparse's: `-f<>`, `-oi`, `-bs`),
as is a run under the name `sendmail`, `mailq` or `newaliases` (a symlink to this program).

Heavy imports stay inside the branches, so `mailhaven sendmail` and `--help` start fast.
Exit codes: 0 ok, 1 operation failed, 2 usage or configuration error (argparse's convention).
"""

from __future__ import annotations

import argparse
import sys

from mailhaven import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailhaven",
        description="a complete mail server",
        epilog="-c FILE may stand anywhere on the line; without it every command reads "
        "$MAILHAVEN_CONFIG, else /etc/mailhaven/mailhaven.toml when it exists, else the "
        "built-in defaults.",
    )
    parser.add_argument("--version", action="version", version=f"mailhaven {__version__}")
    parser.add_argument("-c", "--config", help="TOML configuration file")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the server (built-in defaults without -c)")
    # internal: how the daemon starts its worker processes (mailhaven.runtime.workers)
    serve.add_argument("--worker-fds", help=argparse.SUPPRESS)
    serve.add_argument("--shard", type=int, default=1, help=argparse.SUPPRESS)
    serve.add_argument("--lifeline", type=int, help=argparse.SUPPRESS)
    check = sub.add_parser("config", help="configuration tools")
    check_sub = check.add_subparsers(dest="config_command", required=True)
    check_sub.add_parser("check", help="validate a configuration file")
    tls = sub.add_parser("tls", help="TLS tools")
    tls_sub = tls.add_subparsers(dest="tls_command", required=True)
    self_signed = tls_sub.add_parser("selfsigned", help="create a self-signed certificate")
    self_signed.add_argument("--out", help="directory (default: <state_dir>/tls)")
    dkim = sub.add_parser("dkim", help="DKIM signing keys (keygen DOMAIN | check DOMAIN)")
    dkim.add_argument("args", nargs=argparse.REMAINDER)
    user = sub.add_parser("user", help="manage mailbox users (add|passwd|delete|list)")
    user.add_argument("args", nargs=argparse.REMAINDER)
    # Handled before argparse (their options are not argparse's); listed here for --help.
    sub.add_parser("queue", help="inspect and manage the queue (list|show|flush|hold|...)")
    sub.add_parser("mailq", help="list the queue like Postfix's mailq")
    sub.add_parser("sendmail", help="submit a message like /usr/sbin/sendmail (see its --help)")
    status = sub.add_parser("status", help="is the daemon running: listeners, queue, certificate")
    status.add_argument("--json", action="store_true", help="the facts as one JSON object")
    links = sub.add_parser(
        "install-links", help="make sendmail, mailq and newaliases names for this program"
    )
    links.add_argument("--prefix", default="/usr/local", help="default: /usr/local")
    return parser



#: Program names that mean "behave as sendmail" (`sendmail_args` sets the mode from the name).
SENDMAIL_NAMES = ("sendmail", "mailq", "newaliases")
#: Where `install-links` puts each name, below the prefix (Postfix's places).
LINKS = {"sendmail": "sbin", "mailq": "bin", "newaliases": "bin"}


def take_config_option(argv: list[str]) -> tuple[list[str], str | None]:
    """`-c FILE`, `--config FILE` or `--config=FILE` from anywhere on the line, and the rest."""
    rest: list[str] = []
    path: str | None = None
    words = iter(argv)
    for word in words:
        if word in ("-c", "--config"):
            path = next(words, None)
            if path is None:
                raise SystemExit(f"mailhaven: {word} needs a file name")
        elif word.startswith("--config="):
            path = word.partition("=")[2]
        else:
            rest.append(word)
    return rest, path


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        prog = sys.argv[0].rpartition("/")[2]
        argv = sys.argv[1:]
        if prog in SENDMAIL_NAMES:
            return _sendmail(argv, prog)
    if argv and argv[0] == "sendmail":
        return _sendmail(argv[1:], "sendmail")
    argv, config_path = take_config_option(argv)
    if argv and argv[0] in ("queue", "mailq"):
        return _queue(argv[0], argv[1:], config_path)
    args = _parser().parse_args(argv)
    from mailhaven import config as configuration

    try:
        config = configuration.load(configuration.locate(config_path))
        if args.command in ("serve", "config"):  # what would fail only later, when it is used
            configuration.check_files(config)
    except configuration.ConfigError as err:
        print(f"mailhaven: {err}", file=sys.stderr)
        return 2
    match args.command:
        case "serve":
            return _serve(config, args.worker_fds, args.shard, args.lifeline)
        case "config":
            from mailhaven.mailbox.users import UserDB, UsersFileError

            try:  # the users file is part of the configuration: serve and reload refuse it too
                UserDB(config.users_path, domains=config.local_domains).load()
            except UsersFileError as err:
                print(f"mailhaven: {err}", file=sys.stderr)
                return 2
            if warning := configuration.hostname_warning(config):
                print(f"mailhaven: warning: {warning}", file=sys.stderr)
            if warning := configuration.mail_owner_warning(config):
                print(f"mailhaven: warning: {warning}", file=sys.stderr)
            for note in config.deprecated:
                print(f"mailhaven: warning: {note}", file=sys.stderr)
            from mailhaven.signing.keys import KeyFileError, load_all

            try:  # DKIM keys: serve and reload refuse an unusable one, so say it here first
                load_all(config.dkim_key_path, config.dkim.selectors)
            except KeyFileError as err:
                print(f"mailhaven: dkim: {err}", file=sys.stderr)
                return 2
            from pathlib import Path

            from mailhaven.runtime.privileges import loose_modes

            state = config.state_path
            keys = [Path(config.tls.key) if config.tls.key else state / "tls" / "selfsigned.key",
                    state / "acme" / "key.pem", state / "acme" / "account.key"]
            for warning in loose_modes(config.state_path, keys, config.users_path):
                print(f"mailhaven: warning: {warning}", file=sys.stderr)
            print(f"{config.source or '(built-in defaults)'}: configuration is valid")
            return 0
        case "tls":
            from pathlib import Path

            from mailhaven.net import selfsigned

            out = Path(args.out) if args.out else config.state_path / "tls"
            cert, key = out / "selfsigned.crt", out / "selfsigned.key"
            selfsigned.create(cert, key, config.hostname)
            print(f"created {cert} and {key} for {config.hostname}")
            print("use them with:\n" + selfsigned.toml_hint(cert, key), end="")
            return 0
        case "user":
            from mailhaven.cli.user import main as user_main

            if config.source is None and not config.state_path.is_dir():
                # Adding users before the first start is the try-it path: allowed, not silent.
                print(f"mailhaven: built-in defaults: using state directory "
                      f"{config.state_path} (run the server from {config.state_path.parent})",
                      file=sys.stderr)
            config.users_path.parent.mkdir(parents=True, exist_ok=True)
            from mailhaven.mailbox.owner import group_id

            box = config.mailbox
            return user_main(
                args.args, users_file=config.users_path, domains=config.local_domains,
                file_mode=box.users_file_mode or None, file_group=group_id(box.users_file_group),
            )
        case "dkim":
            from mailhaven.cli.dkim import main as dkim_main

            return dkim_main(args.args, config=config)
        case "status":
            from mailhaven.cli import status as status_command

            return status_command.main(config, as_json=args.json)
        case "install-links":
            return _install_links(args.prefix)
    return 2


def _install_links(prefix: str) -> int:
    """Symlinks under `prefix` that run this program as sendmail, mailq and newaliases, so
    cron, PHP's mail() and scripts find `/usr/sbin/sendmail`-style names."""
    import shutil
    from pathlib import Path

    found = shutil.which(sys.argv[0]) or shutil.which("mailhaven")
    if found is None:
        print("mailhaven: cannot tell where the mailhaven program is", file=sys.stderr)
        return 1
    target = Path(found).resolve()
    for name, folder in LINKS.items():
        link = Path(prefix) / folder / name
        try:
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                if link.resolve() == target:
                    print(f"{link} -> {target} (already)")
                    continue
                if not link.is_symlink():
                    print(f"mailhaven: {link} exists and is not our link; left alone",
                          file=sys.stderr)
                    return 1
                link.unlink()
            link.symlink_to(target)
        except OSError as err:
            print(f"mailhaven: {link}: {err.strerror}", file=sys.stderr)
            return 1
        print(f"{link} -> {target}")
    return 0


def _sendmail(argv: list[str], prog: str) -> int:
    """Local submission; its own config lookup (-C, $MAILHAVEN_CONFIG) and exit codes."""
    from mailhaven.cli.sendmail import sendmail_main

    return sendmail_main(argv, prog)


def _queue(word: str, argv: list[str], path: str | None) -> int:
    """`mailhaven queue VERB ...` and `mailhaven mailq` (`-c FILE` taken off already)."""
    from mailhaven import config as configuration
    from mailhaven.cli import queue

    if argv[:1] in (["-h"], ["--help"]) or (word == "queue" and not argv):
        return queue.main(argv or ["--help"], config=configuration.Config())
    try:
        config = configuration.load(configuration.locate(path))
        configuration.require_state(config)
    except configuration.ConfigError as err:
        print(f"mailhaven: {err}", file=sys.stderr)
        return 2
    if word == "mailq":
        return queue.mailq_main(argv, config=config)
    return queue.main(argv, config=config)


def _serve(
    config: object, worker_fds: str | None = None, shard: int = 1, lifeline: int | None = None
) -> int:
    import logging

    from mailhaven.app import App
    from mailhaven.config import Config, ConfigError, hostname_warning
    from mailhaven.mailbox.users import UsersFileError
    from mailhaven.runtime import eventloop, logtargets
    from mailhaven.runtime.workers import WorkerRole

    assert isinstance(config, Config)
    logtargets.setup(
        config.hostname, config.log_level, target=config.log, log_format=config.log_format
    )
    role = None
    if worker_fds:
        role = WorkerRole(shard, tuple(int(fd) for fd in worker_fds.split(",")), lifeline)
    else:
        print(f"mailhaven: state directory {config.state_path}", file=sys.stderr)
        if warning := hostname_warning(config):
            logging.getLogger("mailhaven.master").warning("%s", warning)
        for note in config.deprecated:
            logging.getLogger("mailhaven.master").warning("%s", note)
    try:
        return eventloop.run(config.event_loop, App(config, worker=role).run())
    except (UsersFileError, ConfigError) as err:  # ConfigError: e.g. an unusable DKIM key
        print(f"mailhaven: cannot start: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # Typically a listen address in use or a state directory we may not write.
        print(f"mailhaven: cannot start: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
