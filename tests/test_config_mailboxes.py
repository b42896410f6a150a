"""[quota], [folders] and LMTP next hops: what `config check` accepts and refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailhaven.config import ConfigError, load


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
