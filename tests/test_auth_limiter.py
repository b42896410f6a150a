"""The failed-login limiter: pure, with time passed in."""

from __future__ import annotations

import pytest

from mailhaven.auth_limiter import AuthLimiter
from mailhaven.mailbox.users import normalize_name


def test_blocks_an_ip_after_max_failures_and_releases_after_window() -> None:
    lim = AuthLimiter(max_failures=3, window=60.0)
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
    lim = AuthLimiter(max_failures=2, window=100.0)
    lim.failed("192.0.2.1", "alice", 0.0)
    lim.failed("192.0.2.2", "alice", 1.0)
    assert lim.check("192.0.2.3", "alice", 2.0).allowed
    lim.failed("192.0.2.1", "alice", 2.0)
    assert not lim.check("192.0.2.1", "alice", 3.0).allowed
    assert lim.check("192.0.2.2", "alice", 3.0).allowed


def test_success_clears_the_pair_not_the_address() -> None:
    lim = AuthLimiter(max_failures=2, window=100.0)
    lim.failed("192.0.2.1", "alice", 0.0)
    lim.succeeded("192.0.2.1", "alice", 1.0)
    lim.failed("192.0.2.1", "bob", 2.0)
    assert not lim.check("192.0.2.1", "alice", 2.0).allowed  # the address has two
    lim = AuthLimiter(max_failures=3, window=100.0)
    lim.failed("192.0.2.9", "x", 3.0)
    lim.failed("192.0.2.9", "y", 3.0)
    lim.failed("192.0.2.9", "w", 3.0)
    lim.succeeded("192.0.2.9", "z", 4.0)
    assert not lim.check("192.0.2.9", "z", 4.0).allowed  # the address stays blocked


@pytest.mark.parametrize("spelling", [" alice", "alice\xa0", "\u2003alice", "ALICE", "\uff41\uff4c\uff49\uff43\uff45"])
def test_look_alike_names_share_the_users_count(spelling: str) -> None:
    # What the SMTP and POP3 logins do: one canonical name for the limiter and the lookup.
    lim = AuthLimiter(max_failures=2, window=100.0)
    lim.failed("192.0.2.1", normalize_name("alice"), 0.0)
    lim.failed("192.0.2.2", normalize_name(spelling), 0.0)
    assert normalize_name(spelling) == "alice"
    # two failures against one pair block it; a look-alike is the same pair
    lim.failed("192.0.2.1", normalize_name(spelling), 1.0)
    assert not lim.check("192.0.2.1", normalize_name("alice"), 2.0).allowed


def test_ipv6_is_counted_per_64() -> None:
    lim = AuthLimiter(max_failures=2, window=100.0)
    lim.failed("2001:db8:1:2::1", None, 0.0)
    lim.failed("2001:db8:1:2:ffff::9", None, 0.0)
    assert not lim.check("2001:db8:1:2::77", None, 1.0).allowed
    assert lim.check("2001:db8:1:3::1", None, 1.0).allowed


def test_memory_is_bounded() -> None:
    lim = AuthLimiter(max_failures=5, window=100.0, max_keys=10)
    for i in range(1000):
        lim.failed(f"10.0.{i // 256}.{i % 256}", None, float(i))
    assert len(lim._failures) <= 10
