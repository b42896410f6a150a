"""RFC 6647 greylisting decisions, as pure functions of (entry, now)."""

from __future__ import annotations

from mailhaven.checks.greylist import (
    Entry,
    GreylistSettings,
    client_allowed,
    client_key,
    decide,
    expired,
    triplet_key,
)

S = GreylistSettings(delay=300, retry_window=3600, allow_lifetime=86400, auto_allow_after=1)


def test_first_attempt_early_retry_then_pass() -> None:
    decision, entry = decide(None, 1000, S)
    assert not decision.passed and decision.wait == 300 and decision.reason == "new"
    decision, entry = decide(entry, 1100, S)
    assert not decision.passed and decision.wait == 200 and entry.first_seen == 1000
    decision, entry = decide(entry, 1300, S)
    assert decision.passed and decision.first_pass and entry.passed
    decision, entry = decide(entry, 50000, S)
    assert decision.passed and not decision.first_pass and decision.reason == "known"


def test_a_retry_too_late_starts_over() -> None:
    _, entry = decide(None, 0, S)
    decision, entry = decide(entry, 3601, S)
    assert not decision.passed and decision.reason == "new" and entry.first_seen == 3601


def test_a_passed_triplet_unused_too_long_starts_over() -> None:
    entry = Entry(0, 10, passed=True)
    decision, _ = decide(entry, 10 + 86401, S)
    assert not decision.passed


def test_keys_group_a_sending_farm_and_untag_batv() -> None:
    assert client_key("192.0.2.77") == "192.0.2.0/24"
    assert client_key("::ffff:192.0.2.77") == "192.0.2.0/24"
    assert client_key("2001:db8:1:2:3::9") == "2001:db8:1:2::/64"
    assert client_key("junk") == "junk"
    tagged = triplet_key("192.0.2.1", "prvs=1234abcd=Bob@Example.org", "Alice@Local.test")
    assert tagged == triplet_key("192.0.2.200", "bob@example.org", "alice@local.test")
    assert triplet_key("192.0.2.1", "", "a@b.test") == "192.0.2.0/24  a@b.test"


def test_auto_allow() -> None:
    assert client_allowed(1, 0, 100, S)
    assert not client_allowed(0, 0, 100, S)
    assert not client_allowed(5, 0, 86401, S)
    assert not client_allowed(5, 0, 1, GreylistSettings(auto_allow_after=0))


def test_expiry() -> None:
    assert expired(Entry(0, 0), 3601, S) and not expired(Entry(0, 0), 3599, S)
    assert expired(Entry(0, 0, True), 86401, S) and not expired(Entry(0, 0, True), 86399, S)
