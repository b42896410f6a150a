"""Cutting input into pieces, shared by the protocol fuzz tests (whole, in pieces, byte by byte
must give the same result)."""

from __future__ import annotations


def cut_into(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut into consecutive pieces of the sizes in `cuts`, repeated as needed."""
    out, pos, i = [], 0, 0
    while pos < len(data):
        size = cuts[i % len(cuts)]
        out.append(data[pos : pos + size])
        pos += size
        i += 1
    return out
