"""Header splitting and milter header edits (libmilter's semantics), as pure functions."""

from __future__ import annotations

import pytest

from mailhaven.proto.milter_edit import apply_edits, field_bytes, split_header
from mailhaven.proto.milter_events import AddHeader, ChangeHeader, InsertHeader

MSG = b"From: a@b\r\nSubject: one\r\n two\r\nX-Tag: 1\r\nx-tag: 2\r\n\r\nbody\r\n"


def test_split_header() -> None:
    header = split_header(MSG, complete=True)
    assert [(f.name, f.value) for f in header.fields] == [
        ("From", " a@b"), ("Subject", " one\n two"), ("X-Tag", " 1"), ("x-tag", " 2"),
    ]
    assert MSG[header.body_offset :] == b"body\r\n"
    assert header.separator == b"\r\n"


def test_split_without_separator_and_partial() -> None:
    header = split_header(b"From: a\r\nnot a header line\r\n", complete=True)
    assert [f.name for f in header.fields] == ["From"] and header.separator == b""
    assert header.body_offset == len(b"From: a\r\n")
    cut = split_header(b"From: a\r\nSubj", complete=False)
    assert [f.name for f in cut.fields] == ["From"]


def edited(edits: list, **kw: bool) -> bytes:  # type: ignore[type-arg]
    return apply_edits(split_header(MSG, complete=True), edits, leading_space=False, **kw)


def test_add_insert_change_delete() -> None:
    out = edited([
        AddHeader("X-Spam", "No"),
        InsertHeader(0, "X-Top", "first"),
        ChangeHeader(2, "x-TAG", "changed"),
        ChangeHeader(1, "Subject", ""),
        ChangeHeader(1, "X-Missing", "appended"),
        ChangeHeader(5, "X-Tag", ""),  # no 5th: nothing to delete
    ])
    assert out == (
        b"X-Top: first\r\nFrom: a@b\r\nX-Tag: 1\r\nx-TAG: changed\r\nX-Spam: No\r\n"
        b"X-Missing: appended\r\n"
    )


def test_trace_first_shifts_indexes() -> None:
    out = edited([InsertHeader(1, "Authentication-Results", "x"), ChangeHeader(1, "Received", "")],
                 trace_first=True)
    assert out.startswith(b"Authentication-Results: x\r\nFrom: a@b\r\n")


def test_values_cannot_inject_fields() -> None:
    assert field_bytes("X-A", "v\nBcc: evil\r\n\r\nbody", leading_space=False) == (
        b"X-A: v\r\n\tBcc: evil\r\n\t\r\n\tbody\r\n"
    )
    assert field_bytes("DKIM-Signature", "v=1;\n\tb=x", leading_space=False) == (
        b"DKIM-Signature: v=1;\r\n\tb=x\r\n"
    )
    for bad in ("", "Bad Name", "Colon:", "Ä"):
        with pytest.raises(ValueError):
            field_bytes(bad, "v", leading_space=False)


def test_value_with_its_own_space_gets_no_second_one() -> None:
    assert field_bytes("DKIM-Signature", " v=1", leading_space=False) == b"DKIM-Signature: v=1\r\n"
    assert field_bytes("X", "v", leading_space=True) == b"X:v\r\n"
