"""Property tests: the address grammar and the DATA framing round trip."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mailhaven.proto.address import (
    AddressError,
    parse_path,
    parse_rcpt_params,
    xtext_decode,
    xtext_encode,
)
from mailhaven.proto.body import DotDecoder, dot_stuff

ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-"
atoms = st.text(alphabet=ATEXT, min_size=1, max_size=10)
local_parts = st.lists(atoms, min_size=1, max_size=4).map(".".join).filter(lambda s: len(s) <= 64)
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
domains = st.lists(labels, min_size=1, max_size=4).map(".".join)


@given(local_parts, domains)
def test_valid_mailboxes_parse_back(local: str, domain: str) -> None:
    address, rest = parse_path(f"<{local}@{domain}> SIZE=10", null_ok=False, utf8=False)
    assert address == f"{local}@{domain}"
    assert rest.strip() == "SIZE=10"


@given(st.text(max_size=80))
def test_parser_never_raises_anything_but_address_error(text: str) -> None:
    try:
        parse_path(text, null_ok=True, utf8=True)
    except AddressError as err:
        assert 500 <= err.reply.code < 600
    try:
        parse_rcpt_params(text, extensions=frozenset({"DSN"}))
    except AddressError as err:
        assert 500 <= err.reply.code < 600


@given(st.text(max_size=60))
def test_xtext_round_trip(text: str) -> None:
    assert xtext_decode(xtext_encode(text)) == text if text.isascii() else True


lines = st.lists(
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=20
)


@settings(max_examples=300)
@given(lines, st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=10))
def test_dot_stuffing_round_trip_any_chunking(content_lines: list[bytes], cuts: list[int]) -> None:
    content = b"".join(line + b"\r\n" for line in content_lines)
    assert decode_in_cuts(dot_stuff(content) + b".\r\nNEXT", cuts) == (content, False, b"NEXT")


def decode_in_cuts(wire: bytes, cuts: list[int]) -> tuple[bytes, bool, bytes]:
    """Feed `wire` to a DotDecoder in pieces of the sizes in `cuts` (round robin) until the
    end of data: (content, tainted by a bare CR/LF, what followed the end marker)."""
    decoder = DotDecoder()
    out, pos, i = b"", 0, 0
    while True:
        size = cuts[i % len(cuts)]
        i += 1
        piece = decoder.feed(wire[pos : pos + size])
        pos += size
        out += piece.data
        if piece.done:
            return out, decoder.bad_newline, piece.rest + wire[pos:]
        assert pos < len(wire), "the end marker was not found"


def _framed_whole(wire: bytes) -> tuple[bytes, bool, bytes] | None:
    """The DATA framing applied to a whole stream at once, as the RFC reads: the content ends
    at the first CRLF "." CRLF (a virtual CRLF before the first line), loses one leading dot
    per line, and is tainted by any CR or LF not paired as CRLF. None: no end yet."""
    buf = b"\r\n" + wire
    end = buf.find(b"\r\n.\r\n")
    if end < 0:
        return None
    content = buf[: end + 2]
    crlf = content.count(b"\r\n")
    bad = content.count(b"\r") != crlf or content.count(b"\n") != crlf
    return content.replace(b"\r\n.", b"\r\n")[2:], bad, buf[end + 5 :]


#: bytes that matter to the framing, often, with some that do not
framing_bytes = st.lists(
    st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"\r\n.", b"\r\n.\r\n", b"a", b"bc", b"x" * 700]),
    max_size=60,
).map(b"".join)


@settings(max_examples=500)
@given(framing_bytes, st.lists(st.integers(min_value=1, max_value=2000), min_size=1, max_size=8))
def test_chunked_decoding_equals_the_whole_stream_framing(content: bytes, cuts: list[int]) -> None:
    wire = content + b"\r\n.\r\nQUIT\r\n"
    expected = _framed_whole(wire)
    assert expected is not None
    assert decode_in_cuts(wire, cuts) == expected
