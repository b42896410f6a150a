"""`mailhaven dkim keygen|check` through `mailhaven.cli.main`, DNS from the loopback server."""

from __future__ import annotations

import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.support.dns_server import DNSServer, dns_server

from mailhaven.cli.main import main
from mailhaven.signing import keys as keystore

__all__ = ["dns_server"]  # the fixture, imported for pytest


@pytest.fixture
def dns_servers(dns_server: Callable[..., DNSServer]) -> Callable[..., DNSServer]:
    return dns_server


def config(tmp_path: Path, nameserver: tuple[str, int] = ("127.0.0.1", 9)) -> str:
    path = tmp_path / "mailhaven.toml"
    path.write_text(f'state_dir = "state"\nlocal_domains = ["example.org"]\n'
                    f'[relay]\nnameservers = ["{nameserver[0]}:{nameserver[1]}"]\n')
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def published(out: str) -> tuple[str, str]:
    """The record name and the value (its strings joined) from keygen's zone-file line."""
    name, _, rest = out.strip().partition(" 3600 IN TXT ( ")
    value = "".join(part.strip('"') for part in rest.removesuffix(" )").split('" "'))
    return name.rstrip("."), value


def test_keygen_writes_a_private_key_and_prints_the_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(tmp_path)
    code, out, err = run(capsys, "-c", cfg, "dkim", "keygen", "Example.org", "--selector", "s1")
    assert code == 0, err
    key_file = tmp_path / "state" / "dkim" / "example.org" / "s1.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and str(key_file) in err
    name, value = published(out)
    assert name == "s1._domainkey.example.org" and value.startswith("v=DKIM1; k=rsa; p=MII")
    # an independent reading of the key: OpenSSL's public key is the record's p=
    der = subprocess.run(["openssl", "pkey", "-in", str(key_file), "-pubout", "-outform", "DER"],
                         capture_output=True, check=True, timeout=30).stdout
    import base64

    assert keystore.parse_record(value)["p"] == base64.b64encode(der).decode()
    code, _, err = run(capsys, "-c", cfg, "dkim", "keygen", "example.org", "--selector", "s1")
    assert code == 1 and "never replaced" in err
    code, out, _ = run(capsys, "-c", cfg, "dkim", "keygen", "example.org", "--algorithm",
                       "ed25519")
    assert code == 0 and published(out)[0].startswith("ed-") and "k=ed25519" in out
    assert run(capsys, "-c", cfg, "dkim", "keygen", "not a domain")[0] == 2
    assert run(capsys, "-c", cfg, "dkim", "keygen", "example.org", "--selector", "a b")[0] == 1


def test_check_compares_the_published_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dns_servers: Callable[..., DNSServer]
) -> None:
    keys = tmp_path / "state" / "dkim"
    rsa = keystore.generate(keys, "example.org", "good", "rsa")
    ed = keystore.generate(keys, "example.org", "ed", "ed25519")
    other = keystore.generate(tmp_path / "elsewhere", "example.org", "x", "rsa")
    server = dns_servers({
        rsa.record_name: {"TXT": [rsa.txt_value()]},
        ed.record_name: {"TXT": ["v=DKIM1; k=ed25519; p=" + other.public_value()[:44]]},
    })
    cfg = config(tmp_path, server.address)
    code, out, _ = run(capsys, "-c", cfg, "dkim", "check", "example.org")
    assert code == 1
    assert "good._domainkey.example.org: rsa: published, matches the key" in out
    assert "ed._domainkey.example.org: ed25519: the published key differs" in out
    fixed = dns_servers({rsa.record_name: {"TXT": [rsa.txt_value()]},
                        ed.record_name: {"TXT": [ed.txt_value()]}})
    code, out, _ = run(capsys, "-c", config(tmp_path, fixed.address), "dkim", "check",
                       "example.org")
    assert code == 0 and out.count("published, matches the key") == 2


def test_check_missing_and_failing_lookups(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dns_servers: Callable[..., DNSServer]
) -> None:
    keys = tmp_path / "state" / "dkim"
    keystore.generate(keys, "broken.example", "ed", "ed25519")
    keystore.generate(keys, "example.org", "new", "ed25519")
    server = dns_servers({"example.org": {"TXT": ["v=spf1 -all"]}},
                        servfail={"ed._domainkey.broken.example"})
    cfg = config(tmp_path, server.address)
    code, out, _ = run(capsys, "-c", cfg, "dkim", "check", "example.org")
    assert code == 1 and "no record published" in out
    code, out, _ = run(capsys, "-c", cfg, "dkim", "check", "broken.example")
    assert code == 1 and "lookup failed: server failure" in out
    code, _, err = run(capsys, "-c", cfg, "dkim", "check", "nokeys.example")
    assert code == 1 and "no keys for nokeys.example" in err


def test_config_check_reports_an_unusable_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(tmp_path)
    key = keystore.generate(tmp_path / "state" / "dkim", "example.org", "s1", "rsa")
    assert run(capsys, "-c", cfg, "config", "check")[0] == 0
    key.path.chmod(0o644)
    code, _, err = run(capsys, "-c", cfg, "config", "check")
    assert code == 2 and "chmod 600" in err and str(key.path) in err
