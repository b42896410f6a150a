"""Routing policy: acceptance, relay control (every relay disguise), aliases, routes."""

from __future__ import annotations

import ipaddress

import pytest

from mailhaven.routing.route import Route
from mailhaven.routing.router import MAX_EXPANSION, Router, normalise_domain, parse_address

USERS = {"alice", "bob", "carol", "postmaster-user", "catchall"}
UNTRUSTED = "203.0.113.9"
TRUSTED = "192.168.1.20"


def router(**overrides: object) -> Router:
    values: dict[str, object] = {
        "local_domains": ["Example.ORG", "example.net."],
        "mailboxes": lambda: USERS,
        "aliases": {
            "sales": ["alice", "bob@example.net"],
            "info@example.net": ["carol"],
            "team": ["sales", "carol", "dave@remote.example"],
            "ext": ["friend@remote.example"],
        },
        "recipient_delimiter": "+",
        "trusted_networks": [ipaddress.ip_network("192.168.1.0/24"), "2001:db8::/32"],
        "relay_domains": ["backup.example", ".sub.example"],
        "held_domains": ["parttime.example"],
        "transport_map": {"special.example": "[10.0.0.5]:2525", ".tm.example": "smart:25"},
        "local_addresses": ["192.0.2.1"],
    }
    values.update(overrides)
    return Router(**values)  # type: ignore[arg-type]


def check(r: Router, addr: str, ip: str = UNTRUSTED, auth: bool = False) -> int | None:
    result = r.check_recipient(addr, client_ip=ip, authenticated=auth)
    return None if result is None else result.code


# --- acceptance -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "code"),
    [
        ("alice@example.org", None),
        ("ALICE@EXAMPLE.ORG", None),
        ("alice@example.net", None),
        ("alice@example.org.", None),
        ("<alice@example.org>", None),
        ("alice+tag@example.org", None),
        ("sales@example.org", None),
        ("info@example.net", None),
        ("info@example.org", 550),  # domain-specific alias
        ("nobody@example.org", 550),
        ("alice-tag@example.org", 550),  # "-" is not the delimiter
        ("postmaster@example.org", None),
        ("PostMaster@Example.Net", None),
        ("postmaster", None),
        ("POSTMASTER", None),
        ("alice@[192.0.2.1]", None),  # our own address literal
        ("nobody@[192.0.2.1]", 550),
        ("x@[192.0.2.99]", 554),
        ("x@[IPv6:2001:db8::1]", 554),
        ("someone@remote.example", 554),
        ("someone@backup.example", None),  # relay_domains
        ("someone@a.sub.example", None),  # .sub.example wildcard
        ("someone@sub.example", 554),  # wildcard is for subdomains only
        ("someone@parttime.example", None),  # held domains may receive
        ("", 501),
        ("@a,@b", 501),
        ("user@", 501),
        ("user@bad domain", 501),
    ],
)
def test_check_recipient_untrusted(addr: str, code: int | None) -> None:
    assert check(router(), addr) == code


def test_reply_wording_matches_postfix() -> None:
    r = router()
    unknown = r.check_recipient("nobody@example.org", client_ip=UNTRUSTED, authenticated=False)
    assert unknown is not None
    assert unknown.one_line() == (
        "550 5.1.1 <nobody@example.org>: Recipient address rejected: "
        "User unknown in local recipient table"
    )
    denied = r.check_recipient("x@remote.example", client_ip=UNTRUSTED, authenticated=False)
    assert denied is not None
    assert denied.one_line() == "554 5.7.1 <x@remote.example>: Relay access denied"


def test_reply_never_carries_control_characters() -> None:
    bad = router().check_recipient("x\r\n250 ok@remote", client_ip=UNTRUSTED, authenticated=False)
    assert bad is not None
    assert "\r" not in bad.text and "\n" not in bad.text


@pytest.mark.parametrize(
    ("ip", "auth", "code"),
    [
        (UNTRUSTED, False, 554),
        (UNTRUSTED, True, None),
        (TRUSTED, False, None),
        ("::ffff:192.168.1.20", False, None),  # IPv4-mapped
        ("2001:db8::7", False, None),
        ("2001:db9::7", False, 554),
        ("", False, 554),
        ("not-an-ip", False, 554),
    ],
)
def test_relay_permission(ip: str, auth: bool, code: int | None) -> None:
    assert check(router(), "someone@remote.example", ip, auth) == code


def test_catch_all_accepts_unknown_local_parts() -> None:
    r = router(catch_all="catchall")
    assert check(r, "whoever@example.org") is None
    assert check(r, "whoever@remote.example") == 554


def test_mailboxes_are_read_live() -> None:
    users: set[str] = set()
    r = router(mailboxes=lambda: users)
    assert check(r, "newbie@example.org") == 550
    users.add("newbie")
    assert check(r, "newbie@example.org") is None


# --- relay disguises ------------------------------------------------------------------------

DISGUISES = [
    "user%remote.example@example.org",
    "user%remote.example%example.org@example.org",
    '"user@remote.example"@example.org',
    '"user%remote.example"@example.org',
    "remote.example!user@example.org",
    "user@remote.example@example.org",
    '"alice@remote.example"@example.org',  # a real user's name inside does not help
    "postmaster%remote.example@example.org",
    "alice%remote.example@[192.0.2.1]",
]


@pytest.mark.parametrize("addr", DISGUISES)
def test_relay_disguises_refused_for_untrusted(addr: str) -> None:
    assert check(router(), addr) == 554
    assert check(router(catch_all="catchall"), addr) == 554


@pytest.mark.parametrize("addr", DISGUISES)
def test_relay_disguises_are_unknown_users_for_trusted(addr: str) -> None:
    """Trusted clients may relay, but we do not rewrite: there is no such user here."""
    assert check(router(), addr, TRUSTED) == 550
    assert check(router(catch_all="catchall"), addr, auth=True) == 550


@pytest.mark.parametrize("addr", DISGUISES)
def test_relay_disguises_never_route_remote_or_to_catch_all(addr: str) -> None:
    r = router(catch_all="catchall")
    route = r.route(addr)
    assert route.transport == "local"
    assert route.nexthop not in USERS  # the local agent refuses it
    assert all(not a.startswith("catchall@") for a in r.expand(addr))


@pytest.mark.parametrize(
    ("addr", "code"),
    [
        ("@remote.example:alice@example.org", None),  # final mailbox is local
        ("@example.org,@example.net:someone@remote.example", 554),  # route grants nothing
        ("@remote.example:nobody@example.org", 550),
    ],
)
def test_source_routes_use_the_final_mailbox_only(addr: str, code: int | None) -> None:
    assert check(router(), addr) == code


def test_source_route_is_never_a_next_hop() -> None:
    r = router()
    assert r.route("@relay.example:alice@example.org") == Route("local", "alice@example.org")
    assert r.route("@example.org:x@remote.example") == Route("relay", "remote.example")


def test_percent_in_remote_local_part_is_remote_business() -> None:
    assert check(router(), "a%example.org@remote.example", TRUSTED) is None
    assert router().route("a%example.org@remote.example") == Route("relay", "remote.example")


# --- expansion ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("alice@example.org", ["alice@example.org"]),
        ("Alice@Example.Org", ["alice@example.org"]),
        ("alice+news@example.org", ["alice+news@example.org"]),
        ("sales@example.org", ["alice@example.org", "bob@example.net"]),
        ("sales+x@example.org", ["alice@example.org", "bob@example.net"]),
        ("info@example.net", ["carol@example.net"]),
        (
            "team@example.org",
            ["alice@example.org", "bob@example.net", "carol@example.org", "dave@remote.example"],
        ),
        ("ext@example.net", ["friend@remote.example"]),
        ("Someone@Remote.Example", ["Someone@remote.example"]),  # remote local part kept
        ("postmaster", ["postmaster@example.org"]),
        ("nobody@example.org", ["nobody@example.org"]),  # left for the agent to bounce
    ],
)
def test_expand(addr: str, expected: list[str]) -> None:
    assert router().expand(addr) == expected


def test_expand_deduplicates_per_mailbox() -> None:
    r = router(
        aliases={"all": ["alice", "alice@example.net", "ALICE", "x@r.example", "x@r.example"]}
    )
    # each local domain has its own mailboxes: alice@example.net is another one
    assert r.expand("all@example.org") == ["alice@example.org", "alice@example.net", "x@r.example"]


def test_catch_all_expansion() -> None:
    r = router(catch_all="catchall")
    assert r.expand("whoever@example.net") == ["catchall@example.net"]
    assert r.expand("alice@example.net") == ["alice@example.net"]


def test_self_reference_is_the_mailbox() -> None:
    r = router(aliases={"bob": ["bob", "archive@remote.example"]})
    assert r.expand("bob@example.org") == ["bob@example.org", "archive@remote.example"]
    assert r.expand("bob+x@example.org") == ["bob@example.org", "archive@remote.example"]


def test_alias_loop_terminates() -> None:
    r = router(aliases={"a": ["b"], "b": ["c"], "c": ["a", "alice"]})
    assert r.expand("a@example.org") == ["a@example.org", "alice@example.org"]
    assert r.route("a@example.org") == Route("local", "a@example.org")  # not a user: the agent bounces it


def test_alias_loop_with_catch_all() -> None:
    r = router(aliases={"a": ["b"], "b": ["a"]}, catch_all="catchall")
    assert r.expand("a@example.org") == ["catchall@example.org"]


def test_deep_chain_is_cut() -> None:
    chain = {f"l{i}": [f"l{i + 1}"] for i in range(100)}
    result = router(aliases=chain).expand("l0@example.org")
    assert len(result) == 1 and result[0].startswith("l")


def test_exponential_alias_graph_is_cheap() -> None:
    """Two aliases per level, each naming both of the next level: 2**19 paths, one answer."""
    graph = {f"{x}{i}": [f"a{i + 1}", f"b{i + 1}"] for i in range(19) for x in "ab"}
    graph |= {"a19": ["alice"], "b19": ["alice"]}
    assert router(aliases=graph).expand("a0@example.org") == ["alice@example.org"]


def test_expansion_limit() -> None:
    big = {"list": [f"u{i}@remote.example" for i in range(MAX_EXPANSION + 50)]}
    assert len(router(aliases=big).expand("list@example.org")) == MAX_EXPANSION


# --- routes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "route"),
    [
        ("alice@example.org", Route("local", "alice@example.org")),
        ("ALICE@EXAMPLE.NET", Route("local", "alice@example.net")),
        ("alice+tag@example.org", Route("local", "alice@example.org")),
        ("catchall@example.org", Route("local", "catchall@example.org")),
        ("postmaster", Route("local", "postmaster@example.org")),
        ("alice@[192.0.2.1]", Route("local", "alice@example.org")),
        ("x@parttime.example", Route("hold", "parttime.example")),
        ("x@PartTime.Example", Route("hold", "parttime.example")),
        ("x@special.example", Route("relay", "[10.0.0.5]:2525")),
        ("x@a.b.tm.example", Route("relay", "smart:25")),
        ("x@tm.example", Route("relay", "tm.example")),
        ("x@Remote.Example", Route("relay", "remote.example")),
        ("x@[192.0.2.99]", Route("relay", "[192.0.2.99]")),
        ("x@[IPv6:2001:DB8:0::1]", Route("relay", "[IPv6:2001:db8::1]")),
        ("x@bücher.example", Route("relay", "xn--bcher-kva.example")),
    ],
)
def test_route(addr: str, route: Route) -> None:
    assert router().route(addr) == route


def test_relayhost_for_all_non_local_but_not_over_transport_or_hold() -> None:
    r = router(relayhost="[smarthost.example]:587")
    assert r.route("x@remote.example") == Route("relay", "[smarthost.example]:587")
    assert r.route("x@special.example") == Route("relay", "[10.0.0.5]:2525")
    assert r.route("x@parttime.example") == Route("hold", "parttime.example")
    assert r.route("alice@example.org") == Route("local", "alice@example.org")


def test_user_with_delimiter_in_name_wins_over_stripping() -> None:
    r = router(mailboxes=lambda: {"a+b", "a"})
    assert r.route("a+b@example.org") == Route("local", "a+b@example.org")
    assert r.route("a+c@example.org") == Route("local", "a@example.org")


def test_multiple_delimiter_characters() -> None:
    r = router(recipient_delimiter="+-")
    assert r.route("alice-list@example.org") == Route("local", "alice@example.org")
    assert check(r, "alice-list@example.org") is None


# --- domains and parsing --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("Example.ORG", "example.org"),
        ("example.org.", "example.org"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("under_score.example", "under_score.example"),
        ("[192.0.2.1]", "[192.0.2.1]"),
        ("[ipv6:2001:DB8::1]", "[IPv6:2001:db8::1]"),
        ("[300.1.1.1]", None),
        ("a b", None),
        ("", None),
    ],
)
def test_normalise_domain(raw: str, norm: str | None) -> None:
    assert normalise_domain(raw) == norm


def test_idn_local_domain_matches_either_form() -> None:
    r = router(local_domains=["bücher.example"])
    assert r.route("alice@xn--bcher-kva.example") == Route("local", "alice@xn--bcher-kva.example")
    assert r.route("alice@BÜCHER.example") == Route("local", "alice@xn--bcher-kva.example")
    assert r.local_domains == ("xn--bcher-kva.example",)


def test_parse_address_quoted() -> None:
    a = parse_address('"a\\"b"@Example.org')
    assert a is not None
    assert (a.local, a.mailbox, a.domain, a.routed) == ('"a\\"b"', 'a"b', "example.org", False)


# --- virtual domains ------------------------------------------------------------------------


def virtual() -> Router:
    return router(
        mailboxes=lambda: {"alice@example.org", "bob@example.net", "postmaster"},
        aliases={"@example.net": ["bob"], "sales@example.org": ["alice"]},
    )


def test_each_domain_has_its_own_users() -> None:
    r = virtual()
    assert check(r, "alice@example.org") is None
    assert check(r, "alice@example.net") is None  # example.net has a catch-all
    assert r.expand("alice@example.net") == ["bob@example.net"]
    assert check(router(mailboxes=lambda: {"alice@example.org"}), "alice@example.net") == 550
    assert r.route("alice@example.org") == Route("local", "alice@example.org")
    assert r.route("bob@example.net") == Route("local", "bob@example.net")


def test_bare_mailbox_is_at_every_local_domain() -> None:
    r = virtual()
    assert r.route("postmaster@example.net") == Route("local", "postmaster@example.net")
    assert r.route("postmaster@example.org") == Route("local", "postmaster@example.org")


def test_domain_catch_all_comes_after_users_and_aliases() -> None:
    r = virtual()
    assert r.expand("bob@example.net") == ["bob@example.net"]
    assert r.expand("nobody@example.net") == ["bob@example.net"]
    assert check(r, "nobody@example.org") == 550  # the catch-all is example.net's only
    assert r.expand("sales@example.org") == ["alice@example.org"]


def test_global_catch_all_prefers_the_addressed_domain() -> None:
    r = router(mailboxes=lambda: {"c@example.org", "c@example.net"}, catch_all="c")
    assert r.expand("x@example.net") == ["c@example.net"]
    r = router(mailboxes=lambda: {"c@example.org"}, catch_all="c")
    assert r.expand("x@example.net") == ["c@example.org"]
    r = router(mailboxes=lambda: {"c@example.org"}, catch_all="C@Example.ORG")
    assert r.expand("x@example.net") == ["c@example.org"]


def test_parked_domain_is_held_not_relayed_nor_accepted() -> None:
    r = router(parked_domains=["gone.example", "example.org"])
    assert r.route("alice@gone.example") == Route("hold", "gone.example")
    assert check(r, "alice@gone.example") == 554
    assert r.route("alice@example.org") == Route("local", "alice@example.org")  # still local
