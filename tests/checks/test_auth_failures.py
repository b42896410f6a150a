"""The failed-login limiter: pure, with time passed in."""

from __future__ import annotations

import pytest

from mailhaven.checks.auth_failures import AuthLimiter
from mailhaven.mailbox.users import normalize_name


def test_blocks_an_ip_after_max_address_failures_and_releases_after_window() -> None:
    lim = AuthLimiter(max_failures=3, max_address_failures=3, window=60.0)
    for t in (0.0, 1.0, 2.0):
        assert lim.check("192.0.2.1", None, t).allowed
        lim.failed("192.0.2.1", f"user{t}", t)
    verdict = lim.check("192.0.2.1", "someone", 3.0)
    assert not verdict.allowed and verdict.retry_after == 57.0
    assert lim.check("192.0.2.2", "someone", 3.0).allowed
    assert lim.check("192.0.2.1", None, 60.5).allowed  # the first failure aged out


def test_a_user_is_blocked_per_address_never_everywhere() -> None:
    # Failures for alice from one address block alice there, not alice elsewhere: an attacker
    # cannot lock a user out of their own logins (Dovecot's auth penalty is per address too).
    lim = AuthLimiter(max_failures=2, max_address_failures=3, window=100.0)
    lim.failed("192.0.2.1", "alice", 0.0)
    lim.failed("192.0.2.2", "alice", 1.0)
    assert lim.check("192.0.2.3", "alice", 2.0).allowed
    lim.failed("192.0.2.1", "alice", 2.0)
    assert not lim.check("192.0.2.1", "alice", 3.0).allowed
    assert lim.check("192.0.2.1", "bob", 3.0).allowed  # the address is under its own limit
    assert lim.check("192.0.2.2", "alice", 3.0).allowed


def test_the_pair_and_the_address_have_their_own_thresholds() -> None:
    lim = AuthLimiter(max_failures=3, max_address_failures=5, window=100.0)
    for t in range(3):
        lim.failed("192.0.2.1", "alice", float(t))
    assert not lim.check("192.0.2.1", "alice", 3.0).allowed  # the pair's 3
    assert lim.check("192.0.2.1", "bob", 3.0).allowed  # the address has 3 of 5
    lim.failed("192.0.2.1", "bob", 4.0)
    lim.failed("192.0.2.1", None, 5.0)  # a name that is no valid one counts for the address
    verdict = lim.check("192.0.2.1", "carol", 6.0)
    assert not verdict.allowed and verdict.retry_after == 94.0  # the first of the five ages out
    assert lim.check("192.0.2.2", "carol", 6.0).allowed


def test_changed_limits_apply_to_the_counts_so_far() -> None:
    # What a configuration reload does: new limits, the same counts.
    lim = AuthLimiter(max_failures=2, max_address_failures=100, window=100.0)
    lim.failed("192.0.2.1", "alice", 0.0)
    lim.failed("192.0.2.1", "alice", 1.0)
    assert not lim.check("192.0.2.1", "alice", 2.0).allowed
    lim.max_failures = 4
    assert lim.check("192.0.2.1", "alice", 2.0).allowed  # the two count against four now
    lim.failed("192.0.2.1", "alice", 2.0)
    assert lim.check("192.0.2.1", "alice", 3.0).allowed
    lim.failed("192.0.2.1", "alice", 3.0)
    assert not lim.check("192.0.2.1", "alice", 4.0).allowed  # more than the old limit kept
    lim.max_failures, lim.max_address_failures = 100, 4
    verdict = lim.check("192.0.2.1", "bob", 4.0)
    assert not verdict.allowed and verdict.retry_after == 96.0


def test_penalty_doubles_per_failure_of_the_address_up_to_dovecots_ceiling() -> None:
    # Dovecot's auth penalty with auth_failure_delay = 2 s: 2, 4, 8, 15 seconds.
    lim = AuthLimiter(failure_delay=2.0, window=600.0)
    assert lim.penalty("192.0.2.1", 0.0) == 0.0
    delays = []
    for t in range(6):
        lim.failed("192.0.2.1", f"user{t}", float(t))
        delays.append(lim.penalty("192.0.2.1", float(t)))
    assert delays == [2.0, 4.0, 8.0, 15.0, 15.0, 15.0]
    assert lim.penalty("192.0.2.2", 6.0) == 0.0  # per address
    assert lim.penalty("2001:db8::1", 6.0) == 0.0


def test_penalty_lapses_after_a_quiet_spell_and_starts_over() -> None:
    # Dovecot's AUTH_PENALTY_TIMEOUT, 2 + 4 + 8 + 15 = 29 s with the 2 s delay.
    lim = AuthLimiter(failure_delay=2.0, window=600.0)
    for t in range(4):
        lim.failed("192.0.2.1", "alice", float(t))
    assert lim.penalty("192.0.2.1", 3.0 + 28.9) == 15.0
    assert lim.penalty("192.0.2.1", 3.0 + 29.0) == 0.0
    lim.failed("192.0.2.1", "alice", 40.0)  # still counted for the blocks, not the back-off
    assert lim.penalty("192.0.2.1", 40.0) == 2.0
    lim.failed("192.0.2.1", "alice", 41.0)
    assert lim.penalty("192.0.2.1", 41.0) == 4.0
    lim.succeeded("192.0.2.1", "alice", 42.0)  # a right password does not lift the address's
    assert lim.penalty("192.0.2.1", 42.0) == 4.0
    assert AuthLimiter(failure_delay=0.0).penalty("192.0.2.1", 0.0) == 0.0


def test_success_clears_the_pair_not_the_address() -> None:
    lim = AuthLimiter(max_failures=2, max_address_failures=2, window=100.0)
    lim.failed("192.0.2.1", "alice", 0.0)
    lim.succeeded("192.0.2.1", "alice", 1.0)
    lim.failed("192.0.2.1", "bob", 2.0)
    assert not lim.check("192.0.2.1", "alice", 2.0).allowed  # the address has two
    lim = AuthLimiter(max_failures=3, max_address_failures=3, window=100.0)
    lim.failed("192.0.2.9", "x", 3.0)
    lim.failed("192.0.2.9", "y", 3.0)
    lim.failed("192.0.2.9", "w", 3.0)
    lim.succeeded("192.0.2.9", "z", 4.0)
    assert not lim.check("192.0.2.9", "z", 4.0).allowed  # the address stays blocked


@pytest.mark.parametrize("spelling", [" alice", "alice\xa0", "\u2003alice", "ALICE", "\uff41\uff4c\uff49\uff43\uff45"])
def test_look_alike_names_share_the_users_count(spelling: str) -> None:
    # What the SMTP and POP3 logins do: one canonical name for the limiter and the lookup.
    lim = AuthLimiter(max_failures=2, max_address_failures=100, window=100.0)
    lim.failed("192.0.2.1", normalize_name("alice"), 0.0)
    lim.failed("192.0.2.2", normalize_name(spelling), 0.0)
    assert normalize_name(spelling) == "alice"
    # two failures against one pair block it; a look-alike is the same pair
    lim.failed("192.0.2.1", normalize_name(spelling), 1.0)
    assert not lim.check("192.0.2.1", normalize_name("alice"), 2.0).allowed


def test_ipv6_is_counted_per_64() -> None:
    lim = AuthLimiter(max_address_failures=2, window=100.0)
    lim.failed("2001:db8:1:2::1", None, 0.0)
    lim.failed("2001:db8:1:2:ffff::9", None, 0.0)
    assert not lim.check("2001:db8:1:2::77", None, 1.0).allowed
    assert lim.check("2001:db8:1:3::1", None, 1.0).allowed


def test_memory_is_bounded() -> None:
    lim = AuthLimiter(max_failures=5, window=100.0, max_keys=10)
    for i in range(1000):
        lim.failed(f"10.0.{i // 256}.{i % 256}", None, float(i))
    assert len(lim._failures) <= 10
