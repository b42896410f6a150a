"""The failed-login limiter: pure, with time passed in."""

from __future__ import annotations

from mailhaven.auth_limiter import AuthLimiter


def test_blocks_an_ip_after_max_failures_and_releases_after_window() -> None:
    lim = AuthLimiter(max_failures=3, window=60.0)
    for t in (0.0, 1.0, 2.0):
        assert lim.check("192.0.2.1", None, t).allowed
        lim.failed("192.0.2.1", f"user{t}", t)
    verdict = lim.check("192.0.2.1", "someone", 3.0)
    assert not verdict.allowed and verdict.retry_after == 57.0
    assert lim.check("192.0.2.2", "someone", 3.0).allowed
    assert lim.check("192.0.2.1", None, 60.5).allowed  # the first failure aged out


def test_blocks_a_user_across_ips_and_success_clears_only_the_user() -> None:
    lim = AuthLimiter(max_failures=2, window=100.0)
    lim.failed("192.0.2.1", "Alice", 0.0)
    lim.failed("192.0.2.2", "alice", 1.0)
    assert not lim.check("192.0.2.3", "ALICE", 2.0).allowed
    lim.succeeded("192.0.2.3", "alice", 2.0)
    assert lim.check("192.0.2.3", "alice", 2.0).allowed
    lim.failed("192.0.2.9", "x", 3.0)
    lim.failed("192.0.2.9", "y", 3.0)
    lim.succeeded("192.0.2.9", "z", 4.0)
    assert not lim.check("192.0.2.9", "z", 4.0).allowed  # the IP stays blocked


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
