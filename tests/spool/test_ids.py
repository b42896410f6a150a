"""Queue id digits: fixed-width Crockford base-32, most significant first."""

from __future__ import annotations

import random

import pytest

from mailhaven.spool.ids import ALPHABET, encode


def _reference(value: int, width: int) -> str:
    """One digit at a time, the obvious way."""
    digits = []
    for _ in range(width):
        value, rem = divmod(value, len(ALPHABET))
        digits.append(ALPHABET[rem])
    assert value == 0
    return "".join(reversed(digits))


@pytest.mark.parametrize("width", range(0, 14))
def test_encode_matches_the_digit_by_digit_rendering(width: int) -> None:
    rng = random.Random(width)
    values = [0, 1, 31, 32, (1 << (5 * width)) - 1] + [rng.getrandbits(5 * width) for _ in range(500)]
    for value in values:
        if value < 1 << (5 * width):
            assert encode(value, width) == _reference(value, width)


def test_encode_keeps_text_order_equal_to_number_order() -> None:
    rng = random.Random(1)
    values = sorted(rng.getrandbits(55) for _ in range(1000))
    assert [encode(v, 11) for v in values] == sorted(encode(v, 11) for v in values)


@pytest.mark.parametrize(("value", "width"), [(-1, 4), (32**4, 4), (1, 0)])
def test_encode_refuses_what_does_not_fit(value: int, width: int) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        encode(value, width)
