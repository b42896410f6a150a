"""DKIM canonicalization (RFC 6376 §3.4) and header-block parsing, pure functions over bytes.

In: the stored message as bytes (header block, body). Out: canonical bytes for hashing and the
parsed header fields. Only the `relaxed` algorithms are implemented: we sign relaxed/relaxed
(the choice of every large sender; `simple` breaks at the first re-folding relay).

Line ends: the spool holds what the client sent, normally CRLF; a bare LF is read as a line
end too, because the SMTP client sends every line with CRLF, and that is what a verifier sees.

Invariants: `BodyHasher` takes the body in chunks of any size and gives the same digest as
hashing it whole, so a large body never needs to be in memory at once; it keeps at most one
partial line and a count of pending empty lines.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

_WSP_RUN = re.compile(rb"[ \t]+")
_FOLD = re.compile(rb"\r?\n(?=[ \t])")
#: A header field's name: printable ASCII except colon (RFC 5322 §2.2).
_NAME = re.compile(rb"[!-9;-~]+")
_EMPTY_LINE = re.compile(rb"\r?\n\r?\n")


@dataclass(frozen=True, slots=True)
class Field:
    """One header field as stored: `name` as written, `value` everything after the colon
    (folding kept, no final line end)."""

    name: bytes
    value: bytes

    @property
    def key(self) -> bytes:
        return self.name.lower()


def split_message(message: bytes) -> tuple[bytes, bytes]:
    """(header block with its last line end, body): the body starts after the first empty
    line (RFC 5322 §2.1); without one, all of it is header."""
    if message.startswith((b"\r\n", b"\n")):
        return b"", message[2 if message.startswith(b"\r\n") else 1 :]
    match = _EMPTY_LINE.search(message)
    if match is None:
        return message, b""
    return message[: match.start() + 1 + (message[match.start()] == 13)], message[match.end() :]


def parse_fields(header: bytes) -> list[Field]:
    """The header block's fields in order; lines that are no field (and no continuation) are
    skipped: they cannot be signed, and a verifier skips them too."""
    fields: list[Field] = []
    for raw in _logical_lines(header):
        name, colon, value = raw.partition(b":")
        if not colon or not _NAME.fullmatch(name.rstrip(b" \t")):
            continue
        fields.append(Field(name.rstrip(b" \t"), value))
    return fields


def _logical_lines(header: bytes) -> list[bytes]:
    lines: list[bytes] = []
    for line in header.split(b"\n"):
        line = line.removesuffix(b"\r")
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and lines:
            lines[-1] += b"\r\n" + line
        else:
            lines.append(line)
    return lines


def relaxed_header(name: bytes, value: bytes) -> bytes:
    """RFC 6376 §3.4.2: lower-case name, unfold, runs of WSP to one SP, no WSP around the
    colon or at the end; followed by CRLF."""
    value = _WSP_RUN.sub(b" ", _FOLD.sub(b"", value)).strip(b" ")
    return name.strip(b" \t").lower() + b":" + value + b"\r\n"


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 §3.4.4 over a whole body (tests and small messages)."""
    return BodyHasher().canonical(body)


class BodyHasher:
    """Relaxed body canonicalization fed in chunks, hashed as it goes (RFC 6376 §3.4.4, §3.7)."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._partial = b""
        self._empty = 0  # empty lines seen but not yet known not to be trailing
        self._any = False
        self._out: list[bytes] | None = None

    def update(self, chunk: bytes) -> None:
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._line(line)

    def _line(self, line: bytes) -> None:
        line = _WSP_RUN.sub(b" ", line.removesuffix(b"\r")).rstrip(b" ")
        if not line:
            self._empty += 1
            return
        if self._empty:
            self._emit(b"\r\n" * self._empty)
            self._empty = 0
        self._emit(line + b"\r\n")

    def _emit(self, data: bytes) -> None:
        self._any = True
        self._hash.update(data)
        if self._out is not None:
            self._out.append(data)

    def digest(self) -> bytes:
        """The body hash; an unterminated last line counts as a line (§3.4.4 adds its CRLF)."""
        if self._partial:
            partial, self._partial = self._partial, b""
            self._line(partial)
        return self._hash.digest()

    def canonical(self, body: bytes) -> bytes:
        """The canonical body itself (for tests)."""
        self._out = []
        self.update(body)
        self.digest()
        return b"".join(self._out)


def hash_body(chunks: Iterable[bytes]) -> bytes:
    hasher = BodyHasher()
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.digest()
