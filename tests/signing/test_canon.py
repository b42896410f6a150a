"""RFC 6376 relaxed canonicalization: the RFC's own example, and chunked == whole."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from mailhaven.signing.canon import (
    BodyHasher,
    parse_fields,
    relaxed_body,
    relaxed_header,
    split_message,
)

#: RFC 6376 §3.4.5's example message.
EXAMPLE = b"A: X\r\nB : Y\t\r\n\tZ  \r\n\r\n C \r\nD \t E\r\n\r\n\r\n"


def test_rfc_6376_example() -> None:
    header, body = split_message(EXAMPLE)
    fields = parse_fields(header)
    assert b"".join(relaxed_header(f.name, f.value) for f in fields) == b"a:X\r\nb:Y Z\r\n"
    assert relaxed_body(body) == b" C\r\nD E\r\n"


def test_empty_and_unterminated_bodies() -> None:
    assert relaxed_body(b"") == b""
    assert relaxed_body(b"\r\n\r\n") == b""  # only empty lines: nothing
    assert relaxed_body(b"x") == b"x\r\n"  # the last line gets its CRLF (§3.4.4)
    assert relaxed_body(b"a\n\nb  \n") == b"a\r\n\r\nb\r\n"  # bare LF read as a line end


def test_split_message() -> None:
    assert split_message(b"A: 1\r\n\r\nbody") == (b"A: 1\r\n", b"body")
    assert split_message(b"A: 1\n\nbody\n") == (b"A: 1\n", b"body\n")
    assert split_message(b"\r\nbody") == (b"", b"body")
    assert split_message(b"A: 1\r\n") == (b"A: 1\r\n", b"")


def test_fields_keep_folding_and_skip_non_fields() -> None:
    fields = parse_fields(b"Subject: a\r\n b\r\nnot a field\r\nX-Y : z\r\n")
    assert [(f.name, f.value) for f in fields] == [(b"Subject", b" a\r\n b"), (b"X-Y", b" z")]


@given(
    st.lists(st.sampled_from([b"a", b" ", b"\t", b"\r\n", b"\n", b"x y", b"\r"]), max_size=40),
    st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=10),
)
def test_chunked_hash_equals_whole(parts: list[bytes], cuts: list[int]) -> None:
    body = b"".join(parts)
    whole = hashlib.sha256(relaxed_body(body)).digest()
    hasher = BodyHasher()
    pos, i = 0, 0
    while pos < len(body):
        step = cuts[i % len(cuts)]
        hasher.update(body[pos : pos + step])
        pos, i = pos + step, i + 1
    assert hasher.digest() == whole
