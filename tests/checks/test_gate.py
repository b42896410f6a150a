"""The gate's order and exemptions: block lists first, trusted/authenticated/allowed clients
spared the expensive checks, DNS lists and greylisting fail open, sender limits alert once."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import pytest

from mailhaven.checks.dnsbl_lookup import DnsblLookup
from mailhaven.checks.gate import Gate, GateSettings
from mailhaven.checks.greylist import GreylistSettings
from mailhaven.checks.greylist_store import GreylistStore
from mailhaven.checks.sender_limits import SenderLimiter
from mailhaven.config import Config, load
from mailhaven.net.dnslist import ListAnswer
from mailhaven.proto.replies import Reply


@dataclasses.dataclass
class Facts:
    client_ip: str = "192.0.2.1"
    client_name: str = "mail.sender.test"
    helo: str = "mail.sender.test"
    auth_user: str | None = None


class Lists:
    def __init__(self, listed: dict[str, tuple[str, ...]], fail: bool = False) -> None:
        self.listed = listed
        self.fail = fail

    async def query(self, name: str) -> ListAnswer:
        if self.fail:
            return ListAnswer(failed="server failure")
        return ListAnswer(self.listed.get(name, ()), 300)


def config(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "mailhaven.toml"
    path.write_text('hostname = "mx.example.org"\nlocal_domains = ["example.org"]\n'
                    'trusted_networks = ["10.0.0.0/8"]\n' + text)
    return load(path)


async def answer(value: Any) -> Reply | None:
    if inspect.isawaitable(value):
        return await value  # type: ignore[no-any-return]
    return value  # type: ignore[no-any-return]


def make(tmp_path: Path, text: str = "", *, lists: Lists | None = None, grey: bool = False,
         screen: bool = True, **kwargs: Any) -> Gate:
    settings = GateSettings.from_config(config(tmp_path, text), screen=screen)
    store = GreylistStore(tmp_path / "g.sqlite", GreylistSettings()) if grey else None
    if grey:
        settings = dataclasses.replace(settings, greylist=True)
    return Gate(settings, dnsbl=DnsblLookup(lists or Lists({})), greylist=store, **kwargs)


async def rcpt(gate: Gate, facts: Facts, sender: str = "a@sender.test",
               to: str = "bob@example.org") -> Reply | None:
    screen = gate.connect(facts.client_ip, "198.51.100.25")
    assert gate.mail(screen, facts, sender) is None or facts.auth_user
    return await answer(gate.rcpt(screen, facts, sender, to))


DNSBL = '[checks.dnsbl]\nsites = ["bl.example*2", "wl.example*-5"]\nthreshold = 2\n'


async def test_listed_client_is_refused_with_the_list_named(tmp_path: Path) -> None:
    gate = make(tmp_path, DNSBL, lists=Lists({"1.2.0.192.bl.example": ("127.0.0.2",)}))
    reply = await rcpt(gate, Facts())
    assert reply == Reply(554, "Service unavailable; client [192.0.2.1] blocked using bl.example", "5.7.1")


async def test_allow_list_outweighs_a_block_list(tmp_path: Path) -> None:
    lists = Lists({"1.2.0.192.bl.example": ("127.0.0.2",), "1.2.0.192.wl.example": ("127.0.0.2",)})
    assert await rcpt(make(tmp_path, DNSBL, lists=lists), Facts()) is None


async def test_failing_lists_never_refuse(tmp_path: Path) -> None:
    assert await rcpt(make(tmp_path, DNSBL, lists=Lists({}, fail=True)), Facts()) is None


async def test_odd_answers_never_refuse(tmp_path: Path) -> None:
    lists = Lists({"1.2.0.192.bl.example": ("10.0.0.2", "127.255.255.254")})
    assert await rcpt(make(tmp_path, DNSBL, lists=lists), Facts()) is None


@pytest.mark.parametrize(
    "facts", [Facts(client_ip="10.1.1.1"), Facts(auth_user="alice")], ids=["trusted", "authenticated"]
)
async def test_trusted_and_authenticated_clients_skip_the_lists(tmp_path: Path, facts: Facts) -> None:
    lists = Lists({"1.1.1.10.bl.example": ("127.0.0.2",), "1.2.0.192.bl.example": ("127.0.0.2",)})
    assert await rcpt(make(tmp_path, DNSBL, lists=lists), facts) is None


async def test_access_lists(tmp_path: Path) -> None:
    text = DNSBL + ('[checks.access]\nclient_allow = ["192.0.2.0/24"]\nclient_block = ["192.0.2.66"]\n'
                    'sender_block = ["spam.test"]\nrecipient_block = ["noreply@example.org"]\n'
                    'sender_allow = ["friend.test"]\n')
    listed = Lists({"1.2.0.192.bl.example": ("127.0.0.2",), "1.113.0.203.bl.example": ("127.0.0.2",)})
    gate = make(tmp_path, text, lists=listed)
    assert await rcpt(gate, Facts()) is None  # allowed network: the listing is not asked about
    blocked = await rcpt(gate, Facts(client_ip="192.0.2.66"))
    assert blocked is not None and blocked.code == 554 and "Client host rejected" in blocked.text
    spam = await rcpt(gate, Facts(client_ip="10.1.1.1"), sender="x@spam.test")  # even trusted
    assert spam is not None and spam.code == 554 and "Sender address rejected" in spam.text
    noreply = await rcpt(gate, Facts(), to="noreply@example.org")
    assert noreply is not None and noreply.code == 550
    friend = await rcpt(gate, Facts(client_ip="203.0.113.1"), sender="x@friend.test")
    assert friend is None  # an allowed sender skips the lists
    other = await rcpt(gate, Facts(client_ip="203.0.113.1"))
    assert other is not None and other.code == 554


async def test_sender_domain_list(tmp_path: Path) -> None:
    text = '[checks.dnsbl]\nsender_domain_sites = ["dbl.example"]\n'
    gate = make(tmp_path, text, lists=Lists({"spam.test.dbl.example": ("127.0.1.2",)}))
    reply = await rcpt(gate, Facts(), sender="x@spam.test")
    assert reply is not None and reply.code == 554 and "spam.test blocked using dbl.example" in reply.text
    assert await rcpt(gate, Facts(), sender="x@ham.test") is None
    assert await rcpt(gate, Facts(), sender="") is None


async def test_own_helo_refused_only_on_the_mx(tmp_path: Path) -> None:
    facts = Facts(helo="mx.example.org")
    reply = await rcpt(make(tmp_path), facts)
    assert reply is not None and reply.code == 554 and "Helo command rejected" in reply.text
    assert await rcpt(make(tmp_path, screen=False), facts) is None


async def test_greylisting_and_its_exemptions(tmp_path: Path) -> None:
    text = '[checks.greylist]\nallow_networks = ["198.51.100.0/24"]\nallow_domains = ["friend.test"]\n'
    gate = make(tmp_path, text, grey=True)
    reply = await rcpt(gate, Facts())
    assert reply is not None and reply.code == 450 and reply.enhanced == "4.7.1"
    assert "Greylisted, try again in 300 seconds" in reply.text
    assert await rcpt(gate, Facts(client_ip="198.51.100.7")) is None
    assert await rcpt(gate, Facts(), sender="x@friend.test") is None
    assert await rcpt(gate, Facts(client_name="mail.friend.test", client_ip="203.0.113.5")) is None
    assert await rcpt(gate, Facts(auth_user="alice")) is None


async def test_greylist_failure_lets_mail_pass(tmp_path: Path) -> None:
    gate = make(tmp_path, grey=True)
    assert gate.greylist is not None
    gate.greylist.path = tmp_path / "no" / "such" / "dir" / "g.sqlite"
    assert await rcpt(gate, Facts()) is None


async def test_sender_limits_alert_once(tmp_path: Path) -> None:
    alerts: list[tuple[str, str]] = []
    gate = make(tmp_path, screen=False, senders=SenderLimiter(messages=2, recipients=3),
                alert=lambda subject, text: alerts.append((subject, text)))
    facts = Facts(auth_user="bob")
    screen = gate.connect(facts.client_ip)
    assert gate.mail(screen, facts, "bob@example.org") is None
    for _ in range(3):
        assert gate.rcpt(screen, facts, "bob@example.org", "x@remote.test") is None
    over = gate.rcpt(screen, facts, "bob@example.org", "x@remote.test")
    assert isinstance(over, Reply) and over.code == 450 and over.enhanced == "4.7.1"
    assert "Sender rate limit exceeded for bob" in over.text
    assert gate.mail(screen, facts, "bob@example.org") is None
    refused = gate.mail(screen, facts, "bob@example.org")
    assert refused is not None and refused.code == 450
    # one alert per user and window, whichever limit came first
    assert [s for s, _ in alerts] == ["sender rate limit exceeded by bob"]


async def test_sender_domain_lookups_per_session_are_bounded(tmp_path: Path) -> None:
    from mailhaven.checks.gate import MAX_SENDER_DOMAINS

    gate = make(tmp_path, '[checks.dnsbl]\nsender_domain_sites = ["dbl.example"]\n')
    facts = Facts()
    screen = gate.connect(facts.client_ip)
    for n in range(50):
        gate.mail(screen, facts, f"x@domain{n}.test")
    assert len(screen.rhs) == MAX_SENDER_DOMAINS
    assert await answer(gate.rcpt(screen, facts, "x@domain49.test", "bob@example.org")) is None
