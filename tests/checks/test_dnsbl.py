"""Weighted scores as postscreen computes them, and answers that must not count."""

from __future__ import annotations

from mailhaven.checks.dnsbl import score
from mailhaven.net.dnslist import parse_site

SITES = (
    parse_site("zen.example=127.0.0.[10;11]*8"),
    parse_site("zen.example=127.0.0.[2..9]*3"),
    parse_site("bl.example*2"),
    parse_site("wl.example=127.0.[0..255].[1..3]*-4"),
)


def test_unlisted_scores_zero() -> None:
    result = score(SITES, {"zen.example": (), "bl.example": ()})
    assert result.total == 0 and result.named is None and not result.blocks(1)


def test_weights_add_up_and_the_heaviest_is_named() -> None:
    result = score(SITES, {"zen.example": ("127.0.0.4",), "bl.example": ("127.0.0.2",)})
    assert result.total == 5 and result.named == "zen.example"
    assert result.listed == ("zen.example", "bl.example")
    assert result.blocks(5) and not result.blocks(6)


def test_two_sites_on_one_zone_each_count_their_filter() -> None:
    result = score(SITES, {"zen.example": ("127.0.0.4", "127.0.0.11")})
    assert result.total == 11


def test_an_allow_list_lowers_the_score() -> None:
    result = score(SITES, {"bl.example": ("127.0.0.2",), "wl.example": ("127.0.5.2",)})
    assert result.total == -2 and not result.blocks(1)


def test_an_allow_list_alone_never_blocks() -> None:
    assert not score(SITES, {"wl.example": ("127.0.5.2",)}).blocks(-10)


def test_answers_outside_loopback_and_garbage_are_ignored() -> None:
    result = score(SITES, {"bl.example": ("192.0.2.1", "not-an-ip", "::1")})
    assert result.total == 0 and not result.blocks(1)
    assert result.ignored == ("bl.example: 192.0.2.1",)


def test_a_failed_site_is_simply_absent() -> None:
    assert score(SITES, {}).total == 0
