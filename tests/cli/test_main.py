"""The `mailhaven` command's own words: tls selfsigned, user add into a fresh state dir."""

from __future__ import annotations

import ssl
import subprocess
import sys
import tomllib
from pathlib import Path


def run(*args: str, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailhaven", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_tls_selfsigned_makes_a_loadable_certificate(tmp_path: Path) -> None:
    result = run("tls", "selfsigned", "--out", str(tmp_path / "tls"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "tls" / "selfsigned.crt", tmp_path / "tls" / "selfsigned.key")
    assert (tmp_path / "tls" / "selfsigned.key").stat().st_mode & 0o077 == 0


def test_tls_selfsigned_hint_is_toml_that_names_the_files(tmp_path: Path) -> None:
    """The printed hint, pasted into mailhaven.toml, parses and points at the files made."""
    out = tmp_path / 'odd "dir" \\ name'
    result = run("tls", "selfsigned", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    hint = result.stdout.split("use them with:", 1)[1]
    parsed = tomllib.loads(hint)
    assert Path(parsed["tls"]["cert"]) == out / "selfsigned.crt"
    assert Path(parsed["tls"]["key"]) == out / "selfsigned.key"
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
        parsed["tls"]["cert"], parsed["tls"]["key"]
    )


def test_user_add_creates_the_state_directory(tmp_path: Path) -> None:
    result = run("user", "add", "alice", cwd=tmp_path, stdin="pw\n")
    assert result.returncode == 0, result.stderr
    line = (tmp_path / "mailhaven-data" / "users.passwd").read_text()
    assert line.startswith("alice@localhost:{ARGON2ID}$argon2id$")  # the one local domain
    assert run("user", "list", cwd=tmp_path).stdout.split() == ["alice@localhost"]


def test_unknown_command_is_a_usage_error(tmp_path: Path) -> None:
    result = run("frobnicate", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
