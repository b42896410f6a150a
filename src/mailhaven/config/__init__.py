"""Typed configuration with built-in defaults; an optional TOML file overrides them.

The defaults are a safe "try it" setup: every listener on 127.0.0.1 only, on unprivileged ports
(SMTP 2525, submission 2587, submissions 2465, POP3 2110, POP3S 2995), state in
`./mailhaven-data`, local domain `localhost` with a `postmaster` mailbox, relaying only for
loopback clients. `docs/configuration.md` documents every key.

Loading never half-applies: `load()` either returns a complete, validated `Config` or raises
`ConfigError` with a message naming the file, the key and what is wrong (used by
`mailhaven config check` and by SIGHUP reload, which keeps the old config on error).

The package: `tables` (the schema and its defaults), `reading` (TOML to `Config`),
`validate` (cross-field checks); here, where a command finds its file and `load`. May import
mailbox, net and runtime (to check a users file, a certificate, a user name) and proto; never a
role that runs, since every role reads its settings from here.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path

from mailhaven.config.reading import (
    _anchor,
    _build,
    _move_deprecated_milter_keys,
    _with_line,
    key_line,
)
from mailhaven.config.tables import (
    DEPRECATED_MILTER_KEYS,
    DKIM_SELECTOR,
    MAILBOX_DELIVERY,
    MAX_AUTH_FAILURE_DELAY,
    MAX_AUTO_PROCESSES,
    TEMPERROR_ACTIONS,
    TLS,
    Access,
    Acme,
    Checks,
    ClientChecks,
    Config,
    ConfigError,
    Dkim,
    Dnsbl,
    Etrn,
    Folders,
    Greylisting,
    InboundAuth,
    InboundAuthDomain,
    Limits,
    Listen,
    Mailbox,
    Milter,
    Queue,
    Quota,
    Relay,
    SenderLimits,
    Srs,
    Timeouts,
    auto_processes,
)
from mailhaven.config.validate import (
    FIELD_NAME,
    MAX_PORT,
    POSITIVE,
    check_files,
    check_lmtp_hop,
    check_next_hop,
    hostname_warning,
    mail_owner_warning,
    parse_hostport,
    parse_milter,
    validate,
)

__all__ = [
    "CONFIG_ENV",
    "DEPRECATED_MILTER_KEYS",
    "DKIM_SELECTOR",
    "FIELD_NAME",
    "MAILBOX_DELIVERY",
    "MAX_AUTH_FAILURE_DELAY",
    "MAX_AUTO_PROCESSES",
    "MAX_PORT",
    "POSITIVE",
    "SYSTEM_CONFIG",
    "TEMPERROR_ACTIONS",
    "TLS",
    "Access",
    "Acme",
    "Checks",
    "ClientChecks",
    "Config",
    "ConfigError",
    "Dkim",
    "Dnsbl",
    "Etrn",
    "Folders",
    "Greylisting",
    "InboundAuth",
    "InboundAuthDomain",
    "Limits",
    "Listen",
    "Mailbox",
    "Milter",
    "Queue",
    "Quota",
    "Relay",
    "SenderLimits",
    "Srs",
    "Timeouts",
    "auto_processes",
    "check_files",
    "check_lmtp_hop",
    "check_next_hop",
    "hostname_warning",
    "key_line",
    "load",
    "locate",
    "mail_owner_warning",
    "parse_hostport",
    "parse_milter",
    "require_state",
    "validate",
]

#: Like Postfix's /etc/postfix/main.cf: what every command reads when told nothing else.
SYSTEM_CONFIG = Path("/etc/mailhaven/mailhaven.toml")
#: The environment variable that names the configuration (a file, or a directory holding one).
CONFIG_ENV = "MAILHAVEN_CONFIG"


def locate(path: str | Path | None, env: Mapping[str, str] | None = None) -> str | None:
    """The configuration file every command uses: `-c` > $MAILHAVEN_CONFIG > SYSTEM_CONFIG when
    it exists > None (the built-in defaults). A directory means its `mailhaven.toml`."""
    env = os.environ if env is None else env
    chosen = str(path) if path else env.get(CONFIG_ENV) or None
    if chosen is None:
        return str(SYSTEM_CONFIG) if SYSTEM_CONFIG.is_file() else None
    return os.path.join(chosen, "mailhaven.toml") if os.path.isdir(chosen) else chosen


def require_state(config: Config) -> None:
    """Refuse to work on a state directory that does not exist when only the built-in defaults
    name it: their `./mailhaven-data` is relative to the caller's directory, and a command run
    from cron or a web application elsewhere would make a second, unseen queue there."""
    if config.source is None and not config.state_path.is_dir():
        raise ConfigError(
            f"no mailhaven state directory at {config.state_path}: with the built-in defaults it "
            f"is ./{config.state_dir} of the directory the server runs in; name the server's "
            f"configuration file (-c FILE; sendmail: -C FILE), set ${CONFIG_ENV}, or install "
            f"it as {SYSTEM_CONFIG}"
        )


def load(path: str | Path | None) -> Config:
    """Built-in defaults, overridden by the TOML file at `path` when given."""
    if path is None:
        return validate(Config())
    try:
        with open(path, "rb") as fh:
            text = fh.read().decode("utf-8")
        data = tomllib.loads(text)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    except UnicodeDecodeError as err:  # TOML is UTF-8 (TOML 1.0 "Spec")
        raise ConfigError(f"{path}: not UTF-8 (byte {err.start})") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: TOML syntax error: {err}") from None
    try:
        deprecated = tuple(_move_deprecated_milter_keys(data))
        config = _anchor(_build(Config, data, ""), Path(path).absolute().parent)
        return validate(dataclasses.replace(config, source=str(path), deprecated=deprecated))
    except ConfigError as err:
        raise _with_line(err, str(path), text) from None
