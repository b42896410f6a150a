"""`mailhaven config check` (and `serve`) catch what would fail only later, name the line of the
error, suggest the key meant, and warn about a host name that is not fully qualified; the same
checks through `config.load` for the mailbox settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tests.support.server import MailServer

from mailhaven.config import ConfigError, load
from mailhaven.net import selfsigned

#: A configuration that is valid on its own; each case adds its lines after it.
BASE = 'hostname = "mx.example.org"\nstate_dir = "state"\n'


def run(config: Path, *words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailhaven", *(words or ("config", "check")), "-c", str(config)],
        capture_output=True, text=True, check=False, timeout=60, cwd=config.parent,
    )


def check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "mailhaven.toml"
    path.write_text(text)
    result = run(path)
    assert "Traceback" not in result.stderr
    return result


def refused(tmp_path: Path, text: str) -> str:
    result = check(tmp_path, text)
    assert result.returncode == 2, result.stdout + result.stderr
    return result.stderr


def test_unknown_key_gives_its_line_and_the_key_meant(tmp_path: Path) -> None:
    err = refused(tmp_path, BASE + "smtp_proceses = 2\n")
    assert 'unknown key "smtp_proceses" (line 3); did you mean "smtp_processes"?' in err
    err = refused(tmp_path, BASE + "\n[limits]\nmessage_size = 2048\nrecipents = 200\n")
    assert 'unknown key "recipents" in [limits] (line 6); did you mean "recipients"?' in err
    err = refused(tmp_path, BASE + "[queue]\nxyzzy = 1\n")
    assert 'unknown key "xyzzy" in [queue] (line 4)' in err and "did you mean" not in err


def test_a_wrong_value_gives_its_line(tmp_path: Path) -> None:
    err = refused(tmp_path, BASE + "[limits]\nconnections = 10\nrecipients = 5\n")
    assert "limits.recipients" in err and err.rstrip().endswith("(line 5)")
    # a key in an inline table: the line that holds it
    err = refused(tmp_path, BASE + "\nlimits = { recipients = 5 }\n")
    assert "limits.recipients" in err and "(line 4)" in err


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("[timeouts]\ndata = -1", "timeouts.data: must not be negative"),
        ("[timeouts]\ncommand = 0", "timeouts.command: must be more than 0"),
        ("[timeouts]\nmessage_deadline = -3600", "timeouts.message_deadline: must not be negative"),
        ("[queue]\nlifetime = -5", "queue.lifetime: must not be negative"),
        ("[queue]\nminimal_backoff = 600\nmaximal_backoff = 300", "queue.maximal_backoff"),
        ("[queue]\nconcurrency = 0", "queue.concurrency: must be more than 0"),
        ("[limits]\nconnection_rate = -1", "limits.connection_rate: must not be negative"),
        ("[limits]\ngreet_pause = -0.5", "limits.greet_pause: must not be negative"),
        ("[etrn]\nrelease_interval = -60", "etrn.release_interval: must not be negative"),
        ("[relay]\nport = 70000", "relay.port: between 1 and 65535"),
    ],
)
def test_negative_times_and_limits(tmp_path: Path, line: str, message: str) -> None:
    err = refused(tmp_path, BASE + line + "\n")
    assert message in err and f"(line {BASE.count(chr(10)) + line.count(chr(10)) + 1})" in err


@pytest.mark.parametrize(
    ("relayhost", "message"),
    [
        ("[127.0.0.1]:99999", "bad port '99999'"),
        ("[127.0.0.1]:0", "bad port '0'"),
        ("[127.0.0.1]:smtp", "bad port 'smtp'"),
        ("smarthost.example:", "bad port ''"),
        ("[127.0.0.1", "expected [host] or [host]:port"),
        ("[127.0.0.1]x", "expected [host] or [host]:port"),
        ("smart host.example", "bad host"),
        ("2001:db8::1", "bad host"),  # an IPv6 address needs its brackets
    ],
)
def test_relayhost_syntax_and_port(tmp_path: Path, relayhost: str, message: str) -> None:
    err = refused(tmp_path, BASE + f'relayhost = "{relayhost}"\n')
    assert "relayhost" in err and message in err and "(line 3)" in err


@pytest.mark.parametrize(
    "relayhost",
    ["smarthost.example", "smarthost.example:587", "[smarthost.example]", "[10.1.2.3]:2525",
     "[::1]:25"],
)
def test_good_relayhosts_pass(tmp_path: Path, relayhost: str) -> None:
    result = check(tmp_path, BASE + f'relayhost = "{relayhost}"\n')
    assert result.returncode == 0, result.stderr


def test_transport_next_hops_are_checked_like_relayhost(tmp_path: Path) -> None:
    err = refused(tmp_path, BASE + '[relay]\ntransport = { "example.net" = "[10.0.0.1]:66000" }\n')
    assert "relay.transport.example.net" in err and "bad port" in err and "(line 4)" in err


@pytest.mark.parametrize(
    ("target", "shown"),
    [
        ('"alice, bob"', "'alice, bob'"),  # a list written as one string
        ('["alice", "bob smith"]', "'bob smith'"),
        ('["bob@"]', "'bob@'"),
        ('["@example.org"]', "'@example.org'"),
        ('["bob@exa mple.org"]', "'bob@exa mple.org'"),
    ],
)
def test_alias_target_that_is_not_an_address(tmp_path: Path, target: str, shown: str) -> None:
    err = refused(tmp_path, BASE + f"[aliases]\nroot = [\"postmaster\"]\nteam = {target}\n")
    assert f"aliases.team: {shown} is not a local name or an address" in err
    assert "(line 5)" in err


def test_good_alias_targets_pass(tmp_path: Path) -> None:
    result = check(
        tmp_path,
        BASE + '[aliases]\nteam = ["alice", "bob@example.net", "carol.x+tag@[192.0.2.1]"]\n',
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "mx.crt", tmp_path / "mx.key"
    selfsigned.create(cert, key, "mx.example.org")
    return cert, key


def test_missing_certificate_or_key_is_named(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    cert, key = pair
    err = refused(tmp_path, BASE + f'[tls]\ncert = "absent.crt"\nkey = "{key.name}"\n')
    assert f"tls.cert: cannot read {tmp_path / 'absent.crt'}: No such file" in err
    assert "(line 4)" in err
    err = refused(tmp_path, BASE + f'[tls]\ncert = "{cert.name}"\nkey = "absent.key"\n')
    assert f"tls.key: cannot read {tmp_path / 'absent.key'}: No such file" in err
    assert "(line 5)" in err
    err = refused(tmp_path, BASE + f'[tls]\ncert = "{cert.name}"\nkey = "{tmp_path}"\n')
    assert f"tls.key: cannot read {tmp_path}: Is a directory" in err


def test_certificate_and_key_must_be_a_pair(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    cert, _key = pair
    other_cert, other_key = tmp_path / "other.crt", tmp_path / "other.key"
    selfsigned.create(other_cert, other_key, "other.example.org")
    err = refused(tmp_path, BASE + f'[tls]\ncert = "{cert.name}"\nkey = "{other_key.name}"\n')
    assert f"{cert} and {other_key} are not a PEM certificate and its private key" in err
    err = refused(tmp_path, BASE + f'[tls]\ncert = "{cert.name}"\nkey = "{cert.name}"\n')
    assert "are not a PEM certificate and its private key" in err
    ok = check(tmp_path, BASE + f'[tls]\ncert = "{cert.name}"\nkey = "{_key.name}"\n')
    assert ok.returncode == 0, ok.stderr


def test_serve_refuses_a_missing_certificate_with_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "mailhaven.toml"
    path.write_text(BASE + '[listen]\nsmtp = []\nsubmission = []\nsubmissions = []\npop3 = []\n'
                    'pop3s = []\n[tls]\ncert = "absent.crt"\nkey = "absent.key"\n')
    result = run(path, "serve")
    assert result.returncode == 2
    assert f"tls.cert: cannot read {tmp_path / 'absent.crt'}" in result.stderr
    assert "Traceback" not in result.stderr


def test_non_fqdn_hostname_is_a_warning(tmp_path: Path) -> None:
    for name in ("mx", "localhost"):
        result = check(tmp_path, BASE.replace("mx.example.org", name))
        assert result.returncode == 0 and "configuration is valid" in result.stdout
        assert f"warning: hostname '{name}' is not a fully qualified domain name" in result.stderr
    result = check(tmp_path, BASE)
    assert result.returncode == 0 and "warning" not in result.stderr


def test_serve_logs_the_non_fqdn_hostname_warning(tmp_path: Path) -> None:
    with MailServer(tmp_path, hostname="mx") as server:  # started: its SMTP port accepts
        server.wait_for_log("warning: hostname 'mx' is not a fully qualified domain name")
    with MailServer(tmp_path / "fqdn", hostname="mx.example.org") as server:
        server.wait_for_log("event_loop=")
        assert "fully qualified" not in server.log()


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        ("[mailbox]\nfile_mode = 0o664\n", "gives access to others"),
        ("[mailbox]\ndir_mode = 0o070\n", "the owner needs 0o700"),
        ('[mailbox]\nmail_user = "no-such-user-h7"\n', "mailbox.mail_user: no such user"),
        ('[mailbox]\nmail_user = "root"\n', "is root"),
        ('[mailbox]\nusers_file_group = "no-such-group-h7"\n', "no such group"),
        ('[mailbox]\npop3_expire = "soon"\n', "NEVER"),
        ('local_domains = ["a/b"]\n', "cannot name a mail directory"),
    ],
)
def test_mailbox_settings_are_checked(tmp_path: Path, lines: str, error: str) -> None:
    assert error in refused(tmp_path, BASE + lines)


def test_a_mail_user_the_daemon_cannot_apply_is_a_warning(tmp_path: Path) -> None:
    result = check(tmp_path, 'user = "nobody"\n' + BASE + '[mailbox]\nmail_user = "daemon"\n')
    assert result.returncode == 0, result.stderr
    assert "mailbox.mail_user 'daemon' differs from user 'nobody'" in result.stderr


# -- [quota], [folders], LMTP next hops and [mailbox] delivery through `config.load`


def load_text(tmp_path: Path, text: str) -> object:
    path = tmp_path / "m.toml"
    path.write_text(text)
    return load(path)


def test_good_mailbox_settings(tmp_path: Path) -> None:
    config = load_text(tmp_path, """
recipient_delimiter = "+"
[quota]
default = "1G"
domains = { "a.example" = "storage=2G messages=5000" }
users = { alice = "10G", "bob@a.example" = "none" }
check_at_rcpt = false
[folders]
plus_address = true
junk = "Spam.Suspect"
[relay]
[relay.transport]
"a.example" = "lmtp:unix:/run/dovecot/lmtp"
"b.example" = "lmtp:[127.0.0.1]:24"
"c.example" = "LMTP:store.example"
""")
    assert config.quota.users["alice"] == "10G"  # type: ignore[attr-defined]


@pytest.mark.parametrize("value", ["direct", "queued"])
def test_mailbox_delivery(tmp_path: Path, value: str) -> None:
    config = load_text(tmp_path, f'[mailbox]\ndelivery = "{value}"\n')
    assert config.mailbox.delivery == value  # type: ignore[attr-defined]
    assert load_text(tmp_path, "").mailbox.delivery == "direct"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[quota]\ndefault = "lots"\n', "quota.default: not a size: 'lots'"),
        ('[quota]\nusers = { alice = "storage=1Q" }\n', "quota.users.alice"),
        ('[quota]\ndomains = { "a.example" = "bytes=5" }\n', "quota.domains.a.example"),
        ('[folders]\njunk = "../x"\n', "folders.junk"),
        ('[folders]\njunk = ".Junk"\n', "folders.junk"),
        ('[relay]\ntransport = { "a.example" = "lmtp:unix:relative/path" }\n',
         "expected unix:/absolute/path"),
        ('[relay]\ntransport = { "a.example" = "lmtp:[127.0.0.1]:0" }\n', "bad port"),
        ('[mailbox]\ndelivery = "later"\n', 'mailbox.delivery: "direct" or "queued"'),
        ('[mailbox]\ndelivery = 1\n', "mailbox.delivery"),
    ],
)
def test_bad_mailbox_settings(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, text)
    assert message in str(err.value)
    assert "(line " in str(err.value)
