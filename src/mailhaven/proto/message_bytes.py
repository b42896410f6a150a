"""Facts about a message's bytes found with C-speed scans: where its header ends, how many of
one byte it has, whether a CR stands without its LF.

In: a message (or its start) as `bytes`/`bytearray`, CRLF or LF line ends alike. Out: indices
and counts. Why a module: the DATA framing, intake's header scan, the local agent's loop check
and the Maildir writer each need these, on every message, and each once had its own copy.
Why these ways: CPython counts a single byte with a plain loop but finds one with memchr, and
its reverse search beats its forward one on text; one pass each, no per-line Python.
"""

from __future__ import annotations

import re

#: A CR that does not start a CR LF pair.
BARE_CR = re.compile(rb"\r(?!\n)")


def count_byte(data: bytes, byte: bytes) -> int:
    """`data.count(byte)` for one byte, by what `replace` removes (memchr-fast)."""
    return len(data) - len(data.replace(byte, b""))


def header_end(data: bytes | bytearray, start: int = 0, stop: int | None = None) -> int:
    """Index of the LF that ends the header section's last line (the one just before the empty
    line, whether that is CRLF or LF), searching `data[start:stop]`; -1 when none is there.
    The usual CRLF separator is looked for first, then LF LF only before it."""
    stop = len(data) if stop is None else stop
    end = data.find(b"\n\r\n", start, stop)
    lf = data.find(b"\n\n", start, end + 1 if end >= 0 else stop)
    return lf if lf >= 0 else end


def crlf_to_lf(data: bytes, *, no_bare_cr: bool = False) -> bytes:
    """CR LF -> LF for a message held whole; a bare CR stays. Where no CR is bare (mail that
    came over SMTP: its framing refuses bare CRs) deleting every CR is the same conversion, and
    several times cheaper than replacing the two-byte pair; `no_bare_cr` says the caller knows
    that already, which spares the search."""
    if no_bare_cr or BARE_CR.search(data) is None:
        return data.replace(b"\r", b"")
    return data.replace(b"\r\n", b"\n")
