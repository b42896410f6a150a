"""`[checks.*]` from a file: bad values refused at load time with the key and its line (so
`mailhaven config check` and SIGHUP catch them), and the services built from good ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailhaven.checks.services import CheckServices
from mailhaven.config import ConfigError, load


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[checks.dnsbl]\nsites = ["zen.example=127.0.0"]\n', "checks.dnsbl.sites: 'zen.example=127.0.0': a filter has four octets"),
        ('[checks.dnsbl]\nsender_domain_sites = ["nodot"]\n', "checks.dnsbl.sender_domain_sites"),
        ("[checks.dnsbl]\nthreshold = 0\n", "checks.dnsbl.threshold: at least 1"),
        ("[checks.dnsbl]\nwait = 0\n", "checks.dnsbl.wait"),
        ("[checks.dnsbl]\nwait = 600\n", "checks.dnsbl.wait"),
        ('[checks.access]\nclient_block = ["300.1.2.3"]\n', "checks.access.client_block"),
        ('[checks.access]\nsender_block = ["two words"]\n', "checks.access.sender_block: 'two words'"),
        ('[checks.greylist]\nallow_networks = ["x"]\n', "checks.greylist.allow_networks"),
        ("[checks.greylist]\ndelay = 600\nretry_window = 300\n", "checks.greylist.retry_window"),
        ("[checks.greylist]\nmax_entries = 0\n", "checks.greylist"),
        ("[checks.sender_limits]\nmessages = -1\n", "checks.sender_limits.messages: must not be negative"),
        ("[checks.dnsbl]\nsites = 3\n", "checks.dnsbl.sites"),
        ("[checks.greylist]\nenable = true\n", 'did you mean "enabled"?'),
    ],
)
def test_bad_values_are_refused_with_key_and_line(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "mailhaven.toml"
    path.write_text('hostname = "mx.example.org"\n' + toml)
    with pytest.raises(ConfigError) as err:
        load(path)
    assert message in str(err.value)
    assert "(line " in str(err.value)


async def test_services_keep_state_across_a_reconfigure(tmp_path: Path) -> None:
    path = tmp_path / "mailhaven.toml"
    path.write_text(f'state_dir = "{tmp_path}/state"\n[checks.sender_limits]\nmessages = 1\n')
    (tmp_path / "state").mkdir()
    services = CheckServices(load(path))
    await services.open()
    assert services.greylist is None  # off: no database
    mx, submission = services.gate(screen=True), services.gate(screen=False)
    assert services.gate(screen=True) is mx and mx.settings.screen and not submission.settings.screen
    assert services.senders.message("bob", 0).allowed
    path.write_text(f'state_dir = "{tmp_path}/state"\n[checks.sender_limits]\nmessages = 5\n'
                    "[checks.greylist]\nenabled = true\n")
    services.reconfigure(load(path))
    await services.open()
    assert services.senders.messages == 5 and services.senders.message("bob", 1).allowed
    assert services.greylist is not None and (tmp_path / "state" / "greylist.sqlite").exists()
    assert services.gate(screen=True) is not mx and services.gate(screen=True).greylist is not None
    await services.close()
