"""Bounded line framing for the server cores: CRLF (or bare LF) lines out of an input buffer.

In: the core's own input buffer (a `bytearray`, consumed in place) and the most a line may hold.
Out: one line at a time without its line end, or None until a whole line is there.

Invariant: memory stays bounded whatever the peer sends. An overlong line is not kept: only its
start is, and that start comes back as the line once its LF arrives. It is longer than any limit,
so the caller refuses it exactly as if it had arrived whole (one reply, same counters), however
the bytes were split.
"""

from __future__ import annotations


class LineReader:
    """The per-connection state of line framing: whether an overlong line is being skipped."""

    def __init__(self) -> None:
        self._discarding = False
        #: The start of the overlong line being skipped.
        self._discarded = b""

    def read(self, buf: bytearray, keep: int) -> bytes | None:
        """The next line of `buf` (consumed), or None if incomplete; a line without its LF that
        grows past `keep` octets is skipped up to its LF (see the module docstring)."""
        nl = buf.find(b"\n")
        if self._discarding:
            if nl < 0:
                buf.clear()
                return None
            del buf[: nl + 1]
            self._discarding = False
            start, self._discarded = self._discarded, b""
            return start
        if nl < 0:
            if len(buf) > keep:
                self._discarding = True
                self._discarded = bytes(buf[: keep + 1])
                buf.clear()
            return None
        line = bytes(buf[:nl])
        del buf[: nl + 1]
        return line[:-1] if line.endswith(b"\r") else line
