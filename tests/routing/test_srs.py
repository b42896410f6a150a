"""SRS in postsrsd's format: postsrsd's own test vectors, reversal, and the router's use."""

from __future__ import annotations

import calendar

import pytest

from mailhaven.routing.route import Route
from mailhaven.routing.router import Router
from mailhaven.routing.srs import SRS, load_secrets

#: postsrsd's tests (run_postsrsd_tests.bats): secret "tops3cr3t", domain example.com, the
#: clock at 2020-01-01 00:01:00 UTC.
NOW = calendar.timegm((2020, 1, 1, 0, 1, 0))
SRS_POSTSRSD = SRS([b"tops3cr3t"], "example.com")


def test_forward_matches_postsrsd() -> None:
    s = SRS_POSTSRSD
    assert s.forward("test@otherdomain.com", NOW) == "SRS0=vmyz=2W=otherdomain.com=test@example.com"
    assert s.forward("test@example.com", NOW) == "test@example.com"  # our own domain: as is
    assert (s.forward("SRS1=X=thirddomain.com==opaque+string@otherdomain.com", NOW)
            == "SRS1=JIBX=thirddomain.com==opaque+string@example.com")
    assert s.forward("SRS0=opaque+string@otherdomain.com", NOW).startswith(
        "SRS1=") and s.forward("", NOW) == "" and s.forward("bla", NOW) == "bla"


@pytest.mark.parametrize(("address", "expected"), [
    ("SRS0=XjO9=2V=otherdomain.com=test@example.com", "test@otherdomain.com"),
    ("SRS1=JIBX=thirddomain.com==opaque+string@example.com", "SRS0=opaque+string@thirddomain.com"),
    ("srs0=xjo9=2v=otherdomain.com=test@example.com", "test@otherdomain.com"),
    ("SRS0=XJO9=2V=OTHERDOMAIN.COM=TEST@EXAMPLE.COM", "TEST@OTHERDOMAIN.COM"),
    ("test@example.com", None),  # not SRS
    ("SRS0=te87=T7=otherdomain.com=test@example.com", None),  # six months old
    ("SRS0=VcIb=7N=otherdomain.com=test@example.com", None),  # six months ahead
    ("SRS0=FAKE=2V=otherdomain.com=test@example.com", None),  # bad hash
    ("SRS0=@example.com", None),
    ("SRS0=XjO9@example.com", None),
    ("SRS0=XjO9=2V@example.com", None),
    ("SRS0=XjO9=2V=otherdomain.com@example.com", None),
    ("SRS1=JIBX=thirddomain.com@example.com", None),
    ("SRS0=XjO9=!!=otherdomain.com=test@example.com", None),
])
def test_reverse_matches_postsrsd(address: str, expected: str | None) -> None:
    assert SRS_POSTSRSD.reverse(address, NOW) == expected


def test_international_addresses_round_trip() -> None:
    s = SRS([b"k"], "fwd.example")
    address = s.forward("Jöhn@bücher.example", NOW)
    assert address.startswith("SRS0=") and s.reverse(address, NOW) == "Jöhn@bücher.example"
    assert s.reverse(address.replace("Jöhn", "JÖHN"), NOW) is None  # only ASCII folds, as libsrs2
    assert s.reverse("SRS0=ÄÄÄÄ=2W=b.example=x@fwd.example", NOW) is None


def test_age_rotation_and_settings() -> None:
    s = SRS([b"new", b"old"], "fwd.example", max_age=3)
    old = SRS([b"old"], "fwd.example").forward("a@b.example", NOW)
    assert s.reverse(old, NOW) == "a@b.example"  # an older secret still reverses
    assert s.reverse(old, NOW + 3 * 86400) == "a@b.example"
    assert s.reverse(old, NOW + 4 * 86400) is None
    assert SRS([b"x"], "f.example", hash_length=8).forward("a@b.example", NOW).index("=", 5) == 13
    with pytest.raises(ValueError):
        SRS([], "f.example")
    with pytest.raises(ValueError):
        SRS([b"x"], "f.example", separator="/")
    assert load_secrets("one\n\n  two \n") == [b"one", b"two"]


def test_router_accepts_and_reverses_our_srs_addresses() -> None:
    s = SRS([b"k"], "example.org")
    router = Router(local_domains=["example.org"], mailboxes=lambda: {"alice"},
                    reverse_srs=lambda a: s.reverse(a, NOW))
    address = s.forward("bob@remote.example", NOW)
    assert router.check_recipient(address, client_ip="192.0.2.1", authenticated=False) is None
    assert router.expand(address) == ["bob@remote.example"]
    assert router.route("bob@remote.example") == Route("relay", "remote.example")
    forged = address.replace("=remote.example=", "=victim.example=")
    refusal = router.check_recipient(forged, client_ip="192.0.2.1", authenticated=False)
    assert refusal is not None and refusal.code == 550
    plain = Router(local_domains=["example.org"], mailboxes=lambda: {"alice"})
    assert plain.check_recipient(address, client_ip="192.0.2.1", authenticated=False) is not None
