"""From TOML text to `Config`: type-checked conversion of each table, unknown keys named with a
guess at what was meant, deprecated spellings moved, relative paths anchored to the file, and
errors located by line.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

from mailhaven.config.tables import DEPRECATED_MILTER_KEYS, WORDS, Config, ConfigError


def _move_deprecated_milter_keys(data: dict[str, Any]) -> list[str]:
    """Old top-level milter keys go to [checks.milter] (one log line each, at start and
    reload); giving a key in both places is an error, not a guess."""
    moved = {old: data.pop(old) for old in list(data) if old in DEPRECATED_MILTER_KEYS}
    if not moved:
        return []
    checks = data.setdefault("checks", {})
    table = checks.setdefault("milter", {}) if isinstance(checks, dict) else None
    if not isinstance(table, dict):
        raise ConfigError("checks.milter: expected a table")
    notes = []
    for old, value in moved.items():
        new = DEPRECATED_MILTER_KEYS[old]
        if new in table:
            raise ConfigError(
                f"{old}: given twice, here and as [checks.milter] {new}; keep the latter", key=old
            )
        table[new] = value
        notes.append(f"{old} is deprecated: write it as {new} in [checks.milter]")
    return notes


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one TOML value to the annotated type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table")
        return _build(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp in (int, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        return tuple(_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        _key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table")
        return {str(k): _convert(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if origin in (types.UnionType, typing.Union):
        return value
    raise ConfigError(f"{where}: unsupported type {tp!r}")


def _build(cls: type[Any], data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = {name for name in fields if name not in ("source", "deprecated")}
    unknown = [k for k in data if k not in names]  # file order: the first typo first
    if unknown:
        key = unknown[0]
        table = f" in [{where}]" if where else ""
        close = difflib.get_close_matches(key, sorted(names), n=1)
        raise ConfigError(
            f'unknown key "{key}"{table}',
            key=f"{where}.{key}" if where else key,
            hint=f'did you mean "{close[0]}"?' if close else "",
        )
    kwargs = {}
    for name, value in data.items():  # file order: the first mistake first
        key = f"{where}.{name}" if where else name
        words = fields[name].metadata.get(WORDS)
        if words and isinstance(value, str):  # e.g. smtp_processes = "auto"
            if value not in words:
                raise ConfigError(f"{key}: a number, or " + " or ".join(f'"{w}"' for w in words))
            value = words[value]()
        kwargs[name] = _convert(value, hints[name], key)
    return cls(**kwargs)


#: "limits.recipients: ..." or "trusted_networks[2]: ...": the key a message is about.
_KEY_PREFIX = re.compile(r"([A-Za-z_][\w.-]*)(?:\[\d+\])?:")
_TABLE = re.compile(r"\s*\[+\s*([^\]]+?)\s*\]+\s*(?:#.*)?$")
_KEY_LINE = re.compile(r"\s*([\w\-.\"' ]+?)\s*=")


def _dotted(text: str) -> list[str]:
    return [part.strip().strip("\"'") for part in text.split(".")]


def key_line(text: str, key: str) -> int | None:
    """The 1-based line where the dotted `key` is set in TOML `text` (its table header when the
    key itself is not on a line of its own, e.g. inside an inline table); None if absent."""
    path = _dotted(key)
    while path:
        table: list[str] = []
        for number, line in enumerate(text.splitlines(), 1):
            if header := _TABLE.match(line):
                table = _dotted(header.group(1))
                if table == path:
                    return number
            elif (assignment := _KEY_LINE.match(line)) and table + _dotted(
                assignment.group(1)
            ) == path:
                return number
        path = path[:-1]
    return None


def _with_line(err: ConfigError, source: str | None, text: str | None = None) -> ConfigError:
    """`err` with the line of its key in the file added: `... (line N)`."""
    message = str(err)
    key = err.key
    if key is None and (prefix := _KEY_PREFIX.match(message)):
        key = prefix.group(1)
    if source is not None and text is None:
        try:
            text = Path(source).read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = None
    line = key_line(text, key) if key and text is not None else None
    if line is not None:
        message += f" (line {line})"
    if err.hint:
        message += f"; {err.hint}"
    return ConfigError(f"{source}: {message}" if source else message)


def _anchor(config: Config, base: Path) -> Config:
    """Relative paths in a file are relative to the file's directory, never the caller's."""

    def anchored(value: str) -> str:
        return value if not value or os.path.isabs(value) else str(base / value)

    tls = dataclasses.replace(config.tls, cert=anchored(config.tls.cert), key=anchored(config.tls.key))
    mailbox = dataclasses.replace(config.mailbox, mail_dir=anchored(config.mailbox.mail_dir))
    return dataclasses.replace(
        config,
        state_dir=anchored(config.state_dir),
        users_file=anchored(config.users_file),
        tls=tls,
        dkim=dataclasses.replace(config.dkim, key_dir=anchored(config.dkim.key_dir)),
        srs=dataclasses.replace(config.srs, secret_file=anchored(config.srs.secret_file)),
        mailbox=mailbox,
    )
