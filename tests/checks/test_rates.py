"""Per-client rate counter (pure)."""

from mailhaven.checks.rates import RateCounter


def test_sliding_minute() -> None:
    rc = RateCounter(2)
    assert rc.allow("a", 0.0) and rc.allow("a", 1.0)
    assert not rc.allow("a", 2.0)
    assert rc.allow("b", 2.0)  # per client
    assert rc.allow("a", 60.5)  # the first one aged out


def test_off_and_bounded_memory() -> None:
    assert all(RateCounter(0).allow("a", float(i)) for i in range(100))
    rc = RateCounter(1, max_clients=10)
    for i in range(100):
        rc.allow(f"c{i}", 0.0)
    assert len(rc._events) == 10
