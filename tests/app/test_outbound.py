"""Outbound authentication from the configuration: SRS secrets and the signing hook."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest

from mailhaven.app.outbound import build_outbound, load_srs
from mailhaven.config import Config, ConfigError, Dkim, Srs
from mailhaven.signing import keys as keystore


def config(tmp_path: Path, **dkim: object) -> Config:
    return Config(state_dir=str(tmp_path / "state"), local_domains=("example.org",),
                  dkim=dataclasses.replace(Dkim(), **dkim))  # type: ignore[arg-type]


def test_srs_secret_is_made_once_private_and_kept(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    first = load_srs(cfg)
    secret = cfg.srs_secret_path
    assert first is not None and stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert first.domain == "example.org"
    address = first.forward("a@b.example", 1_796_000_000)
    again = load_srs(cfg)  # the same file: what was rewritten still reverses
    assert again is not None and again.reverse(address, 1_796_000_000) == "a@b.example"
    secret.write_text("\n\n")
    with pytest.raises(ConfigError, match="holds no secret"):
        load_srs(cfg)
    assert load_srs(dataclasses.replace(cfg, srs=Srs(enabled=False))) is None


def test_hook_from_keys(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert build_outbound(cfg, lambda d: True, None) is None  # no keys, no SRS: nothing to do
    keystore.generate(cfg.dkim_key_path, "example.org", "ed", "ed25519")
    hook = build_outbound(cfg, lambda d: True, None)
    assert hook is not None and hook.arc_key is None  # ARC needs an RSA key
    rsa = keystore.generate(cfg.dkim_key_path, "example.org", "rsa", "rsa")
    hook = build_outbound(cfg, lambda d: True, None)
    assert hook is not None and hook.arc_key is not None and hook.arc_key.selector == "rsa"
    assert [k.selector for k in hook.keys_for("example.org")] == ["ed", "rsa"]
    unsigned = build_outbound(config(tmp_path, sign=False), lambda d: True, None)
    assert unsigned is not None and unsigned.keys == {} and unsigned.arc_key is not None
    rsa.path.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        build_outbound(cfg, lambda d: True, None)
    rsa.path.chmod(0o600)
    with pytest.raises(ConfigError, match=r"arc_domain: other\.example has no RSA key"):
        build_outbound(config(tmp_path, arc_domain="other.example"), lambda d: True, None)


def test_config_refuses_bad_outbound_settings(tmp_path: Path) -> None:
    from mailhaven.config import validate

    with pytest.raises(ConfigError, match=r"srs\.domain"):
        validate(dataclasses.replace(Config(), srs=Srs(domain="elsewhere.example")))
    with pytest.raises(ConfigError, match=r"srs\.hash_length"):
        validate(dataclasses.replace(Config(), srs=Srs(hash_length=40)))
    with pytest.raises(ConfigError, match="not a selector"):
        validate(dataclasses.replace(Config(), dkim=Dkim(selectors={"a.example": ("x y",)})))
