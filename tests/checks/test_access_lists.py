"""Access lists: every entry form, block over allow, bad input never matches by accident."""

from __future__ import annotations

import pytest

from mailhaven.checks.access_lists import ALLOW, BLOCK, AccessLists, AddressList


@pytest.mark.parametrize(
    ("entry", "address", "expected"),
    [
        ("user@example.org", "User@Example.ORG", True),
        ("user@example.org", "user@other.example", False),
        ("example.org", "anyone@example.org", True),
        ("@example.org", "anyone@example.org", True),
        ("example.org", "anyone@sub.example.org", False),
        (".example.org", "anyone@sub.example.org", True),
        (".example.org", "anyone@example.org", False),
        (".example.org", "anyone@badexample.org", False),
        ("user@", "user@anywhere.test", True),
        ("user@", "other@anywhere.test", False),
        ("<>", "", True),
        ("example.org", "", False),
        ("example.org", "not-an-address", False),
    ],
)
def test_entry_forms(entry: str, address: str, expected: bool) -> None:
    assert AddressList.parse([entry]).matches(address) is expected


def test_empty_lists_match_nothing() -> None:
    lists = AccessLists.build()
    assert lists.client("192.0.2.1") is None
    assert lists.sender("") is None
    assert lists.recipient("a@b.example") is None


def test_block_wins_over_allow() -> None:
    lists = AccessLists.build(
        client_allow=["192.0.2.0/24"], client_block=["192.0.2.7"],
        sender_allow=["example.org"], sender_block=["spam@example.org"],
    )
    assert lists.client("192.0.2.7") is BLOCK
    assert lists.client("192.0.2.8") is ALLOW
    assert lists.client("198.51.100.1") is None
    assert lists.sender("spam@example.org") is BLOCK
    assert lists.sender("ham@example.org") is ALLOW


def test_networks_of_both_families_and_mapped_addresses() -> None:
    lists = AccessLists.build(client_block=["2001:db8::/32", "203.0.113.0/24"])
    assert lists.client("2001:db8:1::5") is BLOCK
    assert lists.client("::ffff:203.0.113.9") is BLOCK  # a dual-stack listener's view
    assert lists.client("2001:db9::1") is None
    assert lists.client("not an address") is None


def test_recipient_lists() -> None:
    lists = AccessLists.build(recipient_block=["noreply@example.org"], recipient_allow=["postmaster@"])
    assert lists.recipient("NoReply@example.org") is BLOCK
    assert lists.recipient("postmaster@example.org") is ALLOW
