"""Message-body framing for DATA (dot-terminated) and BDAT (counted), without per-line Python.

The DATA path is where a Python receiver usually loses: aiosmtpd reads one line at a time. Here
each received chunk is scanned with C-speed `bytes` methods: `rfind` for the end marker and any
dot-stuffed line, counts and a search to detect bare CR/LF, `replace` to undo dot-stuffing. A
chunk is cut only just before a CRLF, so a CRLF, a `CRLF.` stuffing sequence or the `CRLF.CRLF`
end marker is never split between two pieces. Lines longer than 1000 octets (RFC 5321
§4.5.3.1.6) are accepted and kept unchanged, like Postfix, which stores long lines whole.

The single framing rule (SMTP smuggling, CVE-2023-51764 family): the end of data is only
`CRLF.CRLF`; any bare CR or bare LF in the content marks the message as tainted, and the receiver
rejects it once the real end has been read (`smtpd_forbid_bare_newline = reject` style). So
`\\n.\\n`, `\\n.\\r\\n`, `\\r.\\r\\n` never end a message, and a message containing them is
never queued.

`MessageBody` applies both framings to one message and adds the size limit (RFC 1870).
"""

from __future__ import annotations

from dataclasses import dataclass

from mailhaven.proto.message_bytes import BARE_CR, count_byte
from mailhaven.proto.replies import BARE_NEWLINE, MESSAGE_TOO_BIG, Reply

END_MARKER = b"\r\n.\r\n"
#: A carry longer than this is no candidate for a marker: flush it (see `DotDecoder.feed`).
_MAX_CARRY = 1024


@dataclass(slots=True)
class Piece:
    """Decoded content ready for the spool, and whether the end of data was reached."""

    data: bytes
    done: bool
    #: Bytes after the end marker (pipelined commands): go back to the command parser.
    rest: bytes = b""


class DotDecoder:
    """Incremental decoder for a DATA body: dot-unstuffing, end detection, bare CR/LF check."""

    __slots__ = ("_carry", "_drop_prefix", "bad_newline")

    def __init__(self) -> None:
        # A virtual CRLF before the first line lets one rule handle a leading "." line.
        self._carry = b"\r\n"
        self._drop_prefix = True
        self.bad_newline = False

    def feed(self, data: bytes) -> Piece:
        buf = self._carry + data if self._carry else data
        # Every end marker and every dot-stuffed line starts with CRLF ".". The usual buffer
        # has none, or one: its end marker. `rfind` settles both in one scan (CPython's reverse
        # search is the faster one), so the full search and the unstuffing below are only for
        # the rare buffer that has a line starting with ".".
        last = buf.rfind(b"\r\n.")
        if last < 0:
            return self._piece(buf, self._cut(buf), unstuff=False)
        if buf.startswith(END_MARKER, last) and buf.rfind(b"\r\n.", 0, last) < 0:
            self._carry = b""
            return Piece(self._decode(buf[: last + 2], unstuff=False), True, buf[last + 5 :])
        end = buf.find(END_MARKER)
        if end >= 0:
            self._carry = b""
            return Piece(self._decode(buf[: end + 2], unstuff=True), True, buf[end + 5 :])
        return self._piece(buf, self._cut(buf), unstuff=True)

    @staticmethod
    def _cut(buf: bytes) -> int:
        """Where to cut a buffer without its end marker: just before its last CRLF, so no CRLF,
        stuffing sequence or marker is split; with no CRLF near the end, only a trailing CR can
        still begin one."""
        cut = buf.rfind(b"\r\n")
        if cut < 0 or len(buf) - cut > _MAX_CARRY:
            cut = len(buf) - 1 if buf.endswith(b"\r") else len(buf)
        return cut

    def _piece(self, buf: bytes, cut: int, *, unstuff: bool) -> Piece:
        self._carry = buf[cut:]
        return Piece(self._decode(buf[:cut], unstuff=unstuff), False)

    def _decode(self, chunk: bytes, *, unstuff: bool) -> bytes:
        if not chunk:
            return b""
        # A bare CR or LF anywhere: CRs and LFs differ in number, or, as many of each, some
        # CR is not followed by LF (each bare CR then leaves an LF without its CR). One search
        # for a bare CR is cheaper than counting the CRLF pairs.
        crs = count_byte(chunk, b"\r")
        if crs != count_byte(chunk, b"\n") or (crs and BARE_CR.search(chunk)):
            self.bad_newline = True
        out = chunk.replace(b"\r\n.", b"\r\n") if unstuff else chunk
        if self._drop_prefix:
            self._drop_prefix = False
            out = out[2:]
        return out


def has_bare_newline(chunk: bytes, *, after_cr: bool) -> tuple[bool, bool]:
    """Check a BDAT chunk for bare CR/LF; return (bad, ends_with_cr) to carry across chunks."""
    if after_cr:
        if not chunk.startswith(b"\n"):
            return True, chunk.endswith(b"\r")
        chunk = chunk[1:]
    ends_cr = chunk.endswith(b"\r")
    body = chunk[:-1] if ends_cr else chunk
    crlf = body.count(b"\r\n")
    bad = body.count(b"\n") != crlf or body.count(b"\r") != crlf
    return bad, ends_cr


def dot_stuff(data: bytes) -> bytes:
    """Encode content for DATA: the inverse of DotDecoder (used by tests and the client)."""
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..")


class MessageBody:
    """One message's content as it arrives, by DATA or by BDAT chunks: the framing above, the
    size limit and the bare-newline taint. The first fault is the message's verdict (`error`);
    content after it is dropped, never handed on, but still read to the end of the message."""

    __slots__ = ("_cr", "_decoder", "_max", "error", "size")

    def __init__(self, max_size: int, *, chunked: bool) -> None:
        self._decoder = None if chunked else DotDecoder()
        self._cr = False  # BDAT: the last chunk ended in CR (CRLF or bare CR, decided later)
        self._max = max_size
        self.size = 0
        self.error: Reply | None = None

    @property
    def chunked(self) -> bool:
        return self._decoder is None

    def read_data(self, buf: bytearray) -> tuple[bytes, bool]:
        """DATA: decode all of `buf` (consumed); returns the content to hand on and whether the
        end marker came. What followed the marker (pipelined commands) is left in `buf`."""
        assert self._decoder is not None
        piece = self._decoder.feed(bytes(buf))
        buf.clear()
        if piece.done:
            buf += piece.rest
        return self._keep(piece.data), piece.done

    def add_chunk(self, data: bytes) -> bytes:
        """BDAT: the octets of an accepted chunk, in order; returns the content to hand on."""
        bad, self._cr = has_bare_newline(data, after_cr=self._cr)
        if bad and self.error is None:
            self.error = BARE_NEWLINE
        return self._keep(data)

    def end(self) -> Reply | None:
        """The whole message is in: None, or the reply refusing it."""
        bare = self._decoder.bad_newline if self._decoder is not None else self._cr
        if bare and self.error is None:
            self.error = BARE_NEWLINE
        return self.error

    def _keep(self, data: bytes) -> bytes:
        if not data or self.error is not None:
            return b""
        self.size += len(data)
        if self.size > self._max:
            self.error = MESSAGE_TOO_BIG
            return b""
        return data
