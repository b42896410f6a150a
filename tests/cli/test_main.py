"""The `mailhaven` command's own words: tls selfsigned, user add into a fresh state dir, help,
install-links, and the one configuration every command finds from anywhere."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mailhaven import config as configuration


def run(
    *args: str, cwd: Path, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailhaven", *args],
        cwd=cwd,
        env=env,
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


# -- one configuration found from anywhere (cron or PHP running `sendmail` elsewhere used a stray
# state directory): -c > $MAILHAVEN_CONFIG > /etc/mailhaven/mailhaven.toml > defaults, and
# relative paths in a file are relative to the file


def test_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = tmp_path / "etc" / "mailhaven.toml"
    monkeypatch.setattr(configuration, "SYSTEM_CONFIG", system)
    env_dir = tmp_path / "envdir"
    env_dir.mkdir()
    assert configuration.locate(None, {}) is None  # nothing anywhere: built-in defaults
    system.parent.mkdir()
    system.write_text("")
    assert configuration.locate(None, {}) == str(system)
    env = {"MAILHAVEN_CONFIG": str(env_dir)}  # a directory means its mailhaven.toml
    assert configuration.locate(None, env) == str(env_dir / "mailhaven.toml")
    assert configuration.locate("/x/given.toml", env) == "/x/given.toml"


def test_relative_paths_are_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "mailhaven.toml").write_text(
        'state_dir = "state"\nusers_file = "users"\n[tls]\ncert = "c.pem"\nkey = "/abs/k.pem"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = configuration.load(conf / "mailhaven.toml")
    assert loaded.state_path == conf / "state"
    assert loaded.users_path == conf / "users"
    assert loaded.tls.cert == str(conf / "c.pem") and loaded.tls.key == "/abs/k.pem"


def cron_env(**extra: str) -> dict[str, str]:
    """What cron gives a job: a bare PATH and little else (plus where our modules are)."""
    return {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join(sys.path), **extra}


def test_built_in_defaults_from_another_directory_fail_loudly(tmp_path: Path) -> None:
    result = run("sendmail", "-t", cwd=tmp_path, env=cron_env(),
                       stdin="To: root@localhost\n\nhi\n")
    assert result.returncode == 75, result
    assert "no mailhaven state directory" in result.stderr
    for words in (["queue", "list"], ["mailq"]):
        result = run(*words, cwd=tmp_path, env=cron_env())
        assert result.returncode == 2 and "no mailhaven state directory" in result.stderr
    assert not (tmp_path / "mailhaven-data").exists()  # no second, unseen queue was made


def test_config_option_anywhere_and_from_the_environment(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "mailhaven.toml").write_text('state_dir = "state"\n')
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    added = run("user", "add", "alice", "-c", str(conf / "mailhaven.toml"), cwd=cwd,
                      env=cron_env(), stdin="pw\n")
    assert added.returncode == 0, added.stderr
    assert (conf / "state" / "users.passwd").exists() and not list(cwd.iterdir())
    listed = run("user", "list", cwd=cwd, env=cron_env(MAILHAVEN_CONFIG=str(conf)))
    assert listed.stdout.split() == ["alice@localhost"]
    queued = run("sendmail", "-t", cwd=cwd, env=cron_env(MAILHAVEN_CONFIG=str(conf)),
                       stdin="To: alice@localhost\nSubject: cron\n\nhi\n")
    assert queued.returncode == 0, queued.stderr
    assert len(list((conf / "state" / "maildrop" / "new").iterdir())) == 1
    mailq = run("--config=" + str(conf / "mailhaven.toml"), "mailq", cwd=cwd,
                      env=cron_env())
    assert "Mail system is down" in mailq.stderr and "alice@localhost" in mailq.stdout


def test_help_version_and_sendmail_help(tmp_path: Path) -> None:
    env = cron_env()
    helped = run("--help", cwd=tmp_path, env=env)
    for word in ("serve", "config", "tls", "user", "queue", "mailq", "sendmail", "install-links"):
        assert f"    {word} " in helped.stdout, word
    version = run("--version", cwd=tmp_path, env=env)
    assert version.returncode == 0 and version.stdout.startswith("mailhaven ")
    usage = run("sendmail", "--help", cwd=tmp_path, env=env)
    assert usage.returncode == 0 and "-bs" in usage.stdout


def test_install_links(tmp_path: Path) -> None:
    prefix = tmp_path / "usr"
    entry = Path(sys.executable).with_name("mailhaven")
    result = subprocess.run([str(entry), "install-links", "--prefix", str(prefix)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    for link in ("sbin/sendmail", "bin/mailq", "bin/newaliases"):
        assert (prefix / link).resolve() == entry.resolve()
    again = subprocess.run([str(entry), "install-links", "--prefix", str(prefix)],
                           capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 0 and "(already)" in again.stdout
    usage = subprocess.run([str(prefix / "sbin" / "sendmail"), "--help"],
                           capture_output=True, text=True, timeout=60, check=False)
    assert usage.returncode == 0 and "usage: sendmail" in usage.stdout
