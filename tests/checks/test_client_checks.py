"""Client checks: each one alone, its reply, and who it spares."""

from __future__ import annotations

import pytest

from mailhaven.checks.client_checks import ClientCheckSettings, check_client, is_fqdn

OURS = frozenset({"mx.example.org", "example.org"})


def check(settings: ClientCheckSettings, *, ip: str = "192.0.2.1", name: str = "mail.sender.test",
          helo: str = "mail.sender.test", server: str = "198.51.100.25") -> int | None:
    reply = check_client(settings, client_ip=ip, client_name=name, helo=helo, own_addresses=(server,))
    return None if reply is None else reply.code


@pytest.mark.parametrize(
    ("helo", "fqdn"),
    [("mail.example.org", True), ("mail.example.org.", True), ("[192.0.2.1]", True),
     ("[IPv6:2001:db8::1]", True), ("localhost", False), ("DESKTOP-1234", False),
     ("192.0.2.1", False), ("a..b", False), ("[not-an-ip]", False), ("", False)],
)
def test_fqdn(helo: str, fqdn: bool) -> None:
    assert is_fqdn(helo) is fqdn


def test_defaults_only_refuse_a_client_claiming_to_be_us() -> None:
    settings = ClientCheckSettings(own_names=OURS)
    assert check(settings, name="unknown", helo="desktop") is None
    assert check(settings, helo="MX.example.org") == 554
    assert check(settings, helo="example.org") == 554
    assert check(settings, helo="[198.51.100.25]") == 554
    assert check(settings, helo="198.51.100.25") == 554
    assert check(settings, helo="[198.51.100.26]") is None


def test_a_client_on_this_host_may_name_us() -> None:
    settings = ClientCheckSettings(own_names=OURS)
    assert check(settings, ip="198.51.100.25", helo="[198.51.100.25]") is None
    assert check(settings, ip="198.51.100.25", helo="mx.example.org") is None
    assert check(settings, ip="127.0.0.3", helo="mx.example.org") == 554


def test_unknown_client_is_a_temporary_refusal() -> None:
    settings = ClientCheckSettings(reject_unknown_client=True, reject_own_helo=False)
    reply = check_client(settings, client_ip="192.0.2.1", client_name="unknown", helo="x.test")
    assert reply is not None and reply.code == 450 and reply.enhanced == "4.7.25"
    assert "[192.0.2.1]" in reply.text
    assert check(settings) is None


def test_non_fqdn_helo() -> None:
    settings = ClientCheckSettings(reject_non_fqdn_helo=True, reject_own_helo=False)
    assert check(settings, helo="desktop") == 504
    assert check(settings, helo="[192.0.2.1]") is None
    assert check(settings) is None


def test_all_off() -> None:
    settings = ClientCheckSettings(reject_own_helo=False)
    assert not settings.enabled
    assert check(settings, name="unknown", helo="mx.example.org") is None
