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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailhaven", description="a complete mail server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server (built-in defaults without -c)")
    serve.add_argument("-c", "--config", help="TOML configuration file")
    # internal: how the daemon starts its worker processes (mailhaven.workers)
    serve.add_argument("--worker-fds", help=argparse.SUPPRESS)
    serve.add_argument("--shard", type=int, default=1, help=argparse.SUPPRESS)
    serve.add_argument("--lifeline", type=int, help=argparse.SUPPRESS)
    check = sub.add_parser("config", help="configuration tools")
    check_sub = check.add_subparsers(dest="config_command", required=True)
    check_cmd = check_sub.add_parser("check", help="validate a configuration file")
    check_cmd.add_argument("-c", "--config", help="TOML configuration file")
    tls = sub.add_parser("tls", help="TLS tools")
    tls_sub = tls.add_subparsers(dest="tls_command", required=True)
    self_signed = tls_sub.add_parser("selfsigned", help="create a self-signed certificate")
    self_signed.add_argument("-c", "--config", help="TOML configuration file")
    self_signed.add_argument("--out", help="directory (default: <state_dir>/tls)")
    user = sub.add_parser("user", help="manage mailbox users (add|passwd|delete|list)")
    user.add_argument("-c", "--config", help="TOML configuration file")
    user.add_argument("args", nargs=argparse.REMAINDER)
    return parser


#: Program names that mean "behave as sendmail" (`sendmail_args` sets the mode from the name).
SENDMAIL_NAMES = ("sendmail", "mailq", "newaliases")


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        prog = sys.argv[0].rpartition("/")[2]
        argv = sys.argv[1:]
        if prog in SENDMAIL_NAMES:
            return _sendmail(argv, prog)
    if argv and argv[0] == "sendmail":
        return _sendmail(argv[1:], "sendmail")
    if argv and argv[0] in ("queue", "mailq"):
        return _queue(argv[0], argv[1:])
    args = _parser().parse_args(argv)
    from mailhaven import config as configuration

    try:
        config = configuration.load(getattr(args, "config", None))
    except configuration.ConfigError as err:
        print(f"mailhaven: {err}", file=sys.stderr)
        return 2
    match args.command:
        case "serve":
            return _serve(config, args.worker_fds, args.shard, args.lifeline)
        case "config":
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

            config.users_path.parent.mkdir(parents=True, exist_ok=True)
            return user_main(args.args, users_file=config.users_path)
    return 2


def _sendmail(argv: list[str], prog: str) -> int:
    """Local submission; its own config lookup (-C, $MAILHAVEN_CONFIG) and exit codes."""
    from mailhaven.cli.sendmail import sendmail_main

    return sendmail_main(argv, prog)


def _queue(word: str, argv: list[str]) -> int:
    """`mailhaven queue [-c FILE] VERB ...` and `mailhaven mailq [-c FILE]`."""
    from mailhaven import config as configuration
    from mailhaven.cli import queue

    path = None
    if argv[:1] in (["-c"], ["--config"]) and len(argv) > 1:
        path, argv = argv[1], argv[2:]
    try:
        config = configuration.load(path)
    except configuration.ConfigError as err:
        print(f"mailhaven: {err}", file=sys.stderr)
        return 2
    if word == "mailq":
        return queue.mailq_main(argv, config=config)
    return queue.main(argv, config=config)


def _serve(
    config: object, worker_fds: str | None = None, shard: int = 1, lifeline: int | None = None
) -> int:
    from mailhaven import eventloop, maillog
    from mailhaven.app import App
    from mailhaven.config import Config
    from mailhaven.workers import WorkerRole

    assert isinstance(config, Config)
    maillog.setup(config.hostname, config.log_level, target=config.log, log_format=config.log_format)
    role = None
    if worker_fds:
        role = WorkerRole(shard, tuple(int(fd) for fd in worker_fds.split(",")), lifeline)
    else:
        print(f"mailhaven: state directory {config.state_path}", file=sys.stderr)
    try:
        return eventloop.run(config.event_loop, App(config, worker=role).run())
    except eventloop.LoopUnavailable as err:
        print(f"mailhaven: cannot start: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        # Typically a listen address in use or a state directory we may not write.
        print(f"mailhaven: cannot start: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
