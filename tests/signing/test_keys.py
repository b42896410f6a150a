"""The key store: generation, the published record, and keys that must not be used."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from mailhaven.signing import keys as keystore


def test_generate_writes_0600_and_never_overwrites(tmp_path: Path) -> None:
    key = keystore.generate(tmp_path, "Example.ORG", "rsa-1", "rsa")
    assert key.path == tmp_path / "example.org" / "rsa-1.key"
    assert stat.S_IMODE(key.path.stat().st_mode) == 0o600
    assert key.algorithm == "rsa" and key.key.key_size == 2048  # type: ignore[union-attr]
    with pytest.raises(FileExistsError):
        keystore.generate(tmp_path, "example.org", "rsa-1", "ed25519")
    with pytest.raises(keystore.KeyFileError):
        keystore.generate(tmp_path, "example.org", "bad selector", "rsa")


def test_records(tmp_path: Path) -> None:
    rsa_key = keystore.generate(tmp_path, "example.org", "rsa-1", "rsa")
    ed_key = keystore.generate(tmp_path, "example.org", "ed-1", "ed25519")
    assert ed_key.txt_value().startswith("v=DKIM1; k=ed25519; p=")
    assert len(ed_key.public_value()) == 44  # 32 octets in base64
    line = rsa_key.zone_line()
    assert line.startswith("rsa-1._domainkey.example.org. 3600 IN TXT ( \"v=DKIM1; k=rsa; p=MII")
    strings = line.split("( ", 1)[1].rstrip(" )").split('" "')
    assert len(strings) == 2 and all(len(s.strip('"')) <= 255 for s in strings)
    assert "".join(s.strip('"') for s in strings) == rsa_key.txt_value()
    assert keystore.parse_record(rsa_key.txt_value())["p"] == rsa_key.public_value()


def test_loading(tmp_path: Path) -> None:
    keystore.generate(tmp_path, "example.org", "b", "rsa")
    keystore.generate(tmp_path, "example.org", "a", "ed25519")
    keystore.generate(tmp_path, "other.example", "s", "ed25519")
    found = keystore.load_all(tmp_path, {})
    assert [k.selector for k in found["example.org"]] == ["a", "b"]  # selector order
    limited = keystore.load_all(tmp_path, {"example.org": ("b",)})
    assert [k.selector for k in limited["example.org"]] == ["b"]
    with pytest.raises(keystore.KeyFileError, match="cannot read"):
        keystore.load_all(tmp_path, {"example.org": ("missing",)})


def write(path: Path, data: bytes, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


def test_unusable_keys_are_refused_with_a_reason(tmp_path: Path) -> None:
    folder = tmp_path / "example.org"
    write(folder / "open.key", b"x", 0o644)
    with pytest.raises(keystore.KeyFileError, match="chmod 600"):
        keystore.load_key(folder / "open.key", "example.org")
    write(folder / "junk.key", b"-----BEGIN PRIVATE KEY-----\nnot a key\n")
    with pytest.raises(keystore.KeyFileError, match="not an unencrypted PEM"):
        keystore.load_key(folder / "junk.key", "example.org")
    # cryptography will not make a key this small; OpenSSL's command still does
    small = subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt",
                            "rsa_keygen_bits:512"], capture_output=True, check=True, timeout=30)
    write(folder / "small.key", small.stdout)
    with pytest.raises(keystore.KeyFileError, match="at least 1024"):
        keystore.load_key(folder / "small.key", "example.org")


def test_a_key_from_opendkim_genkey_loads_and_gives_its_record(tmp_path: Path) -> None:
    """OpenDKIM's key generator is an independent reading of the record format: its key,
    installed as <domain>/<selector>.key, gives the p= its own default.txt publishes."""
    import re
    import shutil

    genkey = shutil.which("opendkim-genkey") or "/usr/sbin/opendkim-genkey"
    if not Path(genkey).exists():
        pytest.skip("opendkim-genkey is not installed (opendkim-tools)")
    subprocess.run([genkey, "-s", "default", "-d", "example.org", "-D", str(tmp_path)],
                   check=True, timeout=60, capture_output=True)
    folder = tmp_path / "keys" / "example.org"
    write(folder / "default.key", (tmp_path / "default.private").read_bytes())
    [key] = keystore.load_all(tmp_path / "keys", {})["example.org"]
    published = "".join(re.findall(r'"([^"]*)"', (tmp_path / "default.txt").read_text()))
    assert key.algorithm == "rsa" and keystore.parse_record(published)["p"] == key.public_value()
