"""The shared byte scans agree with the plain, obviously right versions."""

from __future__ import annotations

import random

import pytest

from mailhaven.proto.message_bytes import count_byte, crlf_to_lf, header_end


def plain_header_end(data: bytes, start: int = 0) -> int:
    hits = [i for i in (data.find(b"\n\n", start), data.find(b"\n\r\n", start)) if i >= 0]
    return min(hits) if hits else -1


@pytest.mark.parametrize(
    "data",
    [b"", b"a\r\nb\r\n", b"a\rb\r\n", b"a\r\nb\r", b"\r\r\n", b"a\nb\r\n", b"\r", b"\n\r", b"x" * 70],
)
def test_crlf_to_lf_keeps_bare_crs_and_count_byte_counts(data: bytes) -> None:
    assert crlf_to_lf(data) == data.replace(b"\r\n", b"\n")
    if b"\r" not in data.replace(b"\r\n", b""):  # what the caller's promise means
        assert crlf_to_lf(data, no_bare_cr=True) == crlf_to_lf(data)
    assert count_byte(data, b"\n") == data.count(b"\n")
    assert count_byte(data, b"\r") == data.count(b"\r")


@pytest.mark.parametrize(
    "head", [b"A: 1\n\n\r\nB", b"A: 1\r\n\r\nB: 2\n\nC", b"A: 1\n\nB\r\n\r\n", b"A: 1\r\n", b""]
)
def test_header_end_is_the_first_empty_line_whatever_the_line_ends(head: bytes) -> None:
    assert header_end(head) == plain_header_end(head)


def test_header_end_agrees_with_the_plain_version_on_random_heads() -> None:
    rnd = random.Random(7)
    for _ in range(20000):
        head = b"".join(rnd.choice([b"\n", b"\r", b"a", b"\r\n", b"\n\n"]) for _ in range(12))
        start = rnd.randrange(len(head) + 1)
        assert header_end(head, start) == plain_header_end(head, start), (head, start)
        assert crlf_to_lf(head) == head.replace(b"\r\n", b"\n")
