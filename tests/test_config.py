"""Configuration: defaults, TOML overrides, and clear errors."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from mailhaven import config as configuration
from mailhaven.config import ConfigError, load, parse_hostport


def test_defaults_are_a_safe_try_it_setup() -> None:
    c = load(None)
    assert c.listen.smtp == ("127.0.0.1:2525",)
    assert all(a.startswith("127.0.0.1:") for a in c.listen.pop3 + c.listen.submission)
    assert c.local_domains == ("localhost",) and "postmaster" in c.local_users
    assert c.state_path == Path("mailhaven-data").absolute()
    assert c.limits.recipients >= 100 and c.source is None


def test_toml_overrides(tmp_path: Path) -> None:
    f = tmp_path / "m.toml"
    f.write_text(
        'hostname = "mx.example.org"\nlocal_domains = ["example.org"]\n'
        '[aliases]\nteam = ["alice", "bob@example.net"]\n'
        '[limits]\nmessage_size = 2048\nerror_sleep = 2\n[listen]\nsmtp = ["[::1]:2600"]\n'
    )
    c = load(f)
    assert c.hostname == "mx.example.org"
    assert c.aliases == {"team": ("alice", "bob@example.net")}
    assert c.limits.message_size == 2048 and c.limits.error_sleep == 2.0
    assert c.listen.smtp == ("[::1]:2600",)
    assert c.listen.pop3 == ("127.0.0.1:2110",)  # untouched defaults stay
    assert c.source == str(f)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hostnme = 'x'", r'unknown key "hostnme" \(line 1\); did you mean "hostname"'),
        ("[limits]\nrecipients = 10", "at least 100"),
        ("[limits]\nmessage_size = 'big'", "expected int"),
        ("trusted_networks = ['10.0.0.0/33']", "trusted_networks"),
        ("[listen]\nsmtp = ['nowhere']", "bad listen address"),
        ("[tls]\ncert = 'a.pem'", "both cert and key"),
        ("[tls]\ncert = 'a'\nkey = 'b'\nacme = { domains = ['x.org'], directory = 'https://ca/d' }",
         "cert and key, or acme, not both"),
        ("[tls]\nacme = { domains = ['x.org'] }", "tls.acme.directory: an https:// URL"),
        ("[tls]\nacme = { domains = ['x.org'], directory = 'http://ca/d' }", "https:// URL"),
        ("[tls]\nacme = { domains = ['*.x.org'], directory = 'https://ca/d' }", "plain host"),
        ("[tls]\nacme = { domains = ['x.org'], directory = 'https://ca/d', "
         "http01_listen = '80' }", "bad listen address"),
        ("[tls]\nacme = { domains = ['x.org'], directory = 'https://ca/d', "
         "check_interval = 0 }", "must be positive"),
        ("[tls]\nacme = { domains = ['x.org'], directory = 'https://ca/d', "
         "http01_listen = '' }", "http01_listen or tls_alpn01_listen is needed"),
        ("[tls]\nacme = { domains = ['x.org'], directory = 'https://ca/d', "
         "tls_alpn01_listen = '443' }", "bad listen address"),
        ("[tls]\nacme = { domain = ['x.org'] }",
         r'unknown key "domain" in \[tls.acme\] \(line 2\); did you mean "domains"\?'),
        ("this is not toml", "TOML syntax error"),
        ("[queue]\nnotice_rate_limit = -1", "queue.notice_rate_limit"),
        ("[queue]\nnotice_rate_window = 0", "queue.notice_rate_limit"),
        ("[limits]\nauth_failures = 0", "limits.auth_failures"),
        ("[limits]\nauth_address_failures = 0", "limits.auth_address_failures"),
        ("[limits]\nauth_failure_delay = -1", "limits.auth_failure_delay"),
        ("[limits]\nauth_failure_delay = 31", "limits.auth_failure_delay: between 0 and 30"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load(f)
    assert str(f) in str(info.value)


def test_acme_table(tmp_path: Path) -> None:
    f = tmp_path / "m.toml"
    f.write_text('[tls]\nacme = { domains = ["mx.example.org"], '
                 'directory = "https://acme.example/dir", email = "pm@example.org" }\n')
    acme = load(f).tls.acme
    assert acme.domains == ("mx.example.org",) and acme.email == "pm@example.org"
    assert acme.http01_listen == "0.0.0.0:80" and acme.renew_before_days == 30
    assert load(None).tls.acme.domains == ()  # off by default


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "absent.toml")


def test_parse_hostport() -> None:
    assert parse_hostport("127.0.0.1:25") == ("127.0.0.1", 25)
    assert parse_hostport("[::1]:2525") == ("::1", 2525)
    with pytest.raises(ConfigError):
        parse_hostport("127.0.0.1:65536")


def test_config_check_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("local_domains = ['example.org']\n")
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\nrecipients = 5\n")
    cmd = [sys.executable, "-m", "mailhaven", "config", "check", "-c"]
    ok = subprocess.run([*cmd, str(good)], capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "valid" in ok.stdout
    err = subprocess.run([*cmd, str(bad)], capture_output=True, text=True, check=False)
    assert err.returncode == 2
    assert "limits.recipients" in err.stderr and "Traceback" not in err.stderr
    assert configuration.Config().limits.recipients == 1000


def test_the_documented_defaults_are_a_valid_configuration(tmp_path: Path) -> None:
    """docs/configuration.md's annotated block must load as it stands (no key in a wrong table)."""
    import re

    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    block = re.search(r"```toml\n(.*?)```", doc, re.S)
    assert block is not None
    path = tmp_path / "documented.toml"
    path.write_text(block.group(1))
    documented = load(str(path))
    assert documented.smtp_processes == configuration.auto_processes() and documented.log_level == "info"
    assert documented.aliases == {}


def _documented_block() -> str:
    import re

    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    block = re.search(r"```toml\n(.*?)```", doc, re.S)
    assert block is not None
    return block.group(1)


def _keys(cls: type[Any], prefix: str = "") -> list[str]:
    """Every configuration key, from the dataclasses (so a key added later is included)."""
    keys = []
    for item in dataclasses.fields(cls):
        if item.name in ("source", "deprecated"):
            continue
        default = item.default_factory() if callable(item.default_factory) else item.default
        if dataclasses.is_dataclass(default):
            keys += _keys(type(default), f"{prefix}{item.name}.")
        else:
            keys.append(prefix + item.name)
    return keys


def test_every_key_is_documented_with_its_default() -> None:
    """docs/configuration.md's annotated block sets every key of the dataclasses, in its table,
    to its built-in default (the machine-dependent `hostname` excepted)."""
    documented = tomllib.loads(_documented_block())
    for key in _keys(configuration.Config):
        *tables, name = key.split(".")
        table, default = documented, configuration.Config()
        for section in tables:
            table, default = table.get(section, {}), getattr(default, section)
        assert name in table, f"{key} is not in docs/configuration.md"
        if key == "hostname":
            continue
        default = getattr(default, name)
        if key == "smtp_processes":  # machine-dependent too: "auto" resolved
            assert table[name] == "auto" and default == configuration.auto_processes()
            continue
        value = table[name]
        value = tuple(value) if isinstance(value, list) else value
        assert value == default and type(value) is type(default), f"{key}: documented {table[name]!r}, default {default!r}"


def test_smtp_processes_auto_is_one_per_usable_core(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text('smtp_processes = "auto"\n')
    expected = min(len(os.sched_getaffinity(0)), configuration.MAX_AUTO_PROCESSES)
    assert load(path).smtp_processes == expected == configuration.auto_processes()


def test_smtp_processes_other_words_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text('smtp_processes = "many"\n')
    with pytest.raises(ConfigError, match="or \"auto\""):
        load(path)


def test_old_top_level_milter_keys_still_work_and_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "old.toml"
    path.write_text(
        'milters = ["inet:127.0.0.1:11332"]\nsubmission_milters = ["unix:/run/dkim.sock"]\n'
        'milter_default_action = "accept"\nmilter_content_timeout = 5\n'
        'milter_reuse = ["inet:127.0.0.1:11332"]\n[checks.greylist]\nenabled = false\n'
    )
    config = load(str(path))
    milter = config.checks.milter
    assert milter.smtpd == ("inet:127.0.0.1:11332",)
    assert milter.submission == ("unix:/run/dkim.sock",)
    assert milter.default_action == "accept" and milter.content_timeout == 5.0
    assert milter.reuse == ("inet:127.0.0.1:11332",)
    assert "milters is deprecated: write it as smtpd in [checks.milter]" in config.deprecated
    assert len(config.deprecated) == 5


def test_a_milter_key_given_both_ways_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "both.toml"
    path.write_text('milters = ["inet:127.0.0.1:1"]\n[checks.milter]\nsmtpd = ["inet:127.0.0.1:2"]\n')
    with pytest.raises(ConfigError, match=r"milters: given twice.*line 1"):
        load(str(path))


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('smtpd = ["tcp:1.2.3.4"]', "checks.milter.smtpd: bad milter address"),
        ('non_smtpd = ["inet:127.0.0.1"]', "checks.milter.non_smtpd: bad milter address"),
        ('quarantine = "discard"', 'checks.milter.quarantine: "junk" or "hold"'),
        ('spam_headers = ["X-Spam"]', "checks.milter.spam_headers: 'X-Spam'"),
        ('spam_headers = ["X Spam: yes"]', "checks.milter.spam_headers"),
        ("command_timeout = 0", "checks.milter.command_timeout: must be positive"),
    ],
)
def test_bad_milter_settings_are_named(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f"[checks.milter]\n{toml}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(str(path))
