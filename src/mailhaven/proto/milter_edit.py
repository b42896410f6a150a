"""Message header fields for milters: split them out of a message, and apply a milter's edits.

In: the start of a message as the client sent it (`split_header`), then the header edits milters
asked for (`HeaderEdits.apply`). Out: the header fields to show a milter (name, value) and the
new header section as bytes; the body is never touched here (a replaced body is streamed by the
caller), so memory stays bounded by the header section.

Invariants: the header section ends at the first empty line, at the first line that is not a
header field (RFC 5322 §2.2; as Postfix's cleanup does), or past `MAX_HEADER_SECTION` bytes;
what follows is body. Edits follow libmilter's documented semantics: `InsertHeader` index 0 is
the top; `ChangeHeader` counts same-named fields from 1, an empty value deletes, and a change
of a field that does not exist adds it at the end.

SECURITY: names and values from a milter are untrusted: a name must be a valid field name
(RFC 5322 §3.6.8) and every line break in a value becomes CRLF followed by white space, so an
edit can never inject a second field or end the header section.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mailhaven.proto.milter_events import AddHeader, ChangeHeader, InsertHeader

#: The header section is looked at up to this many bytes; a longer one continues as body
#: (Postfix's header_size_limit is 102400 bytes per field; we bound the whole section).
MAX_HEADER_SECTION = 1024 * 1024
#: RFC 5322 §3.6.8: printable US-ASCII except colon.
_FIELD_NAME = re.compile(r"[!-9;-~]+\Z")
_FIELD_START = re.compile(rb"([!-9;-~]+)[ \t]*:")


@dataclass(slots=True)
class HeaderField:
    name: str
    #: the value after the colon, folding kept as LF, no final line break
    value: str
    raw: bytes


@dataclass(slots=True)
class Header:
    fields: list[HeaderField] = field(default_factory=list)
    #: where the body starts in the message (after the empty line, if any)
    body_offset: int = 0
    #: whether the message had the empty line that ends a header section
    separator: bytes = b""


def split_header(head: bytes, complete: bool) -> Header:
    """The header fields at the start of `head`. `complete`: `head` is the whole message (a
    header section that runs to its end has no body); otherwise a section longer than `head`
    is cut at `head`'s last complete line."""
    out = Header()
    pos = 0
    limit = min(len(head), MAX_HEADER_SECTION)
    while pos < limit:
        end = head.find(b"\n", pos)
        if end < 0:
            if not complete:
                break
            end = len(head) - 1
        line = head[pos : end + 1]
        if line in (b"\r\n", b"\n"):
            out.separator = line
            pos = end + 1
            break
        if line[:1] in (b" ", b"\t") and out.fields:
            last = out.fields[-1]
            last.raw += line
            last.value += "\n" + _text(line).rstrip("\r\n")
            pos = end + 1
            continue
        match = _FIELD_START.match(line)
        if match is None:
            break  # not a header field: the body starts here, without a separator
        name = match.group(1).decode("ascii")
        value = _text(line[match.end() :]).rstrip("\r\n")
        out.fields.append(HeaderField(name, value, line))
        pos = end + 1
    out.body_offset = pos
    return out


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def field_bytes(name: str, value: str, *, leading_space: bool) -> bytes:
    """One header field from a milter's name and value, folded safely with CRLF."""
    if not _FIELD_NAME.match(name):
        raise ValueError(f"bad header field name {name[:40]!r}")
    lines = value.replace("\r\n", "\n").replace("\r", "\n").replace("\0", "").split("\n")
    first, rest = lines[0], lines[1:]
    # Postfix's rule: a space after the colon unless the value brings its own (OpenDKIM's
    # values start with one) or the milter negotiated to send it verbatim
    sep = ":" if leading_space or first[:1] in (" ", "\t") else ": "
    out = name + sep + first
    for line in rest:
        out += "\r\n" + (line if line[:1] in (" ", "\t") else "\t" + line)
    return (out + "\r\n").encode("utf-8", "surrogateescape")


HeaderEdit = AddHeader | InsertHeader | ChangeHeader


def apply_edits(
    header: Header, edits: list[HeaderEdit], *, leading_space: bool, trace_first: bool = False
) -> bytes:
    """The new header section (without the separator) after `edits`, in order.

    `trace_first`: milters were shown our own `Received:` field first (as Postfix shows its
    own); it is stored before this section by intake, so indexes are shifted past it and it
    cannot itself be changed or deleted."""
    fields: list[tuple[str, bytes]] = [(f.name, f.raw) for f in header.fields]
    for edit in edits:
        if trace_first:
            match edit:
                case InsertHeader(index, name, value):
                    edit = InsertHeader(max(index - 1, 0), name, value)
                case ChangeHeader(index, name, value) if name.lower() == "received":
                    if index <= 1:
                        continue
                    edit = ChangeHeader(index - 1, name, value)
        match edit:
            case AddHeader(name, value):
                fields.append((name, field_bytes(name, value, leading_space=leading_space)))
            case InsertHeader(index, name, value):
                at = min(index, len(fields))
                fields.insert(at, (name, field_bytes(name, value, leading_space=leading_space)))
            case ChangeHeader(index, name, value):
                found = [i for i, (n, _) in enumerate(fields) if n.lower() == name.lower()]
                target = found[index - 1] if 1 <= index <= len(found) else None
                if not value:
                    if target is not None:
                        del fields[target]
                    continue
                data = field_bytes(name, value, leading_space=leading_space)
                if target is None:
                    fields.append((name, data))
                else:
                    fields[target] = (name, data)
    return b"".join(raw for _, raw in fields)
