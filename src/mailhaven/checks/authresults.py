"""The `Authentication-Results:` header field (RFC 8601): ours, and forged ones that claim us.

In: the check results and our authserv-id (the configured `hostname`). Out: one folded header
field (bytes, CRLF) with a `spf`, `dkim` (one per signature, or `dkim=none`), `dmarc` and `arc`
clause, each method's properties as RFC 8601 §2.7 and RFC 7489 §11.2 register them. Values that
are not a plain token or address are quoted, comments have their parentheses escaped, and
control characters never reach the header, whatever the sender put into MAIL FROM.

Forgeries: a field arriving with our authserv-id would be read downstream (by our own users'
filters) as our verdict; RFC 8601 §5 says to remove it. `forged_fields` finds them in a header
block; `strip_fields` returns the header block without them. The authserv-id is read as its
first token after any comments, case-insensitively, so a field that does not parse at all is
left alone (it claims nothing readable).

Formatting is our own plain code: the `authres` package does not quote values (a MAIL FROM with
a quoted local part gives a field that authres itself cannot parse back); the tests parse our
output with authres to check the syntax.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mailhaven.checks.arc_verify import ARCResult
    from mailhaven.checks.dkim_verify import DKIMResult
    from mailhaven.checks.dmarc import DMARCResult
    from mailhaven.checks.spf import SPFResult

FIELD = "Authentication-Results"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: RFC 2045 token, or local-part "@" domain with a dot-atom local part (RFC 8601 §2.2 pvalue).
_PLAIN = re.compile(
    r"[A-Za-z0-9!#$%&'*+\-^_`{|}~.]+"
    r"|(?:[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(?:\.[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*)?@[A-Za-z0-9.\-]+"
)
_ID = re.compile(rb"[^\s;()]+")
_FIELD_NAME = re.compile(rb"authentication-results[ \t]*:", re.I)


def pvalue(text: str) -> str:
    """A property value: as is when it is a token or an address, else a quoted-string."""
    text = _CONTROL.sub("", text)
    if _PLAIN.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def comment(text: str) -> str:
    text = _CONTROL.sub("", text)
    return "(" + text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def spf_clause(result: SPFResult, identity: str, value: str) -> str:
    note = f" {comment(result.reason)}" if result.reason else ""
    return f"spf={result.result}{note} smtp.{identity}={pvalue(value)}"


def dkim_clauses(results: Sequence[DKIMResult]) -> list[str]:
    if not results:
        return ["dkim=none"]
    out = []
    for r in results:
        parts = [f"dkim={r.result}"]
        if r.reason:
            parts.append(comment(r.reason))
        for name, value in (("d", r.domain), ("i", r.identity), ("s", r.selector),
                            ("a", r.algorithm), ("b", r.b)):  # fmt: skip
            if value:
                parts.append(f"header.{name}={pvalue(value)}")
        out.append(" ".join(parts))
    return out


def dmarc_clause(result: DMARCResult) -> str:
    note = ""
    if result.result in ("pass", "fail", "temperror"):
        note = f" (p={result.policy} dis={result.disposition})"
    return f"dmarc={result.result}{note} header.from={pvalue(result.from_domain or 'unknown')}"


def arc_clause(result: ARCResult) -> str:
    note = f" {comment(result.reason)}" if result.reason and result.result == "fail" else ""
    return f"arc={result.result}{note}"


def header_field(authserv_id: str, clauses: Sequence[str]) -> bytes:
    """`Authentication-Results: <id>;` and one clause per folded line (RFC 5322 §2.2.3)."""
    body = ";\r\n\t".join([authserv_id, *clauses]) if clauses else f"{authserv_id}; none"
    return f"{FIELD}: {body}\r\n".encode("utf-8", "replace")


def authserv_id(value: bytes) -> bytes | None:
    """The authserv-id of a field's value: its first token after leading comments."""
    rest = value.lstrip()
    while rest.startswith(b"("):  # CFWS before the id: skip (possibly nested) comments
        depth, i = 0, 0
        while i < len(rest):
            ch = rest[i : i + 1]
            if ch == b"\\":
                i += 2
                continue
            depth += ch == b"("
            depth -= ch == b")"
            i += 1
            if depth == 0:
                break
        rest = rest[i:].lstrip()
    m = _ID.match(rest)
    return m.group(0) if m else None


def _fields(header: bytes) -> list[tuple[int, int]]:
    """(start, end) of each header field in `header` (up to the empty line), continuation
    lines included."""
    spans: list[tuple[int, int]] = []
    pos = 0
    while pos < len(header):
        end = header.find(b"\n", pos)
        end = len(header) if end < 0 else end + 1
        line = header[pos:end]
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") and spans:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((pos, end))
        pos = end
    return spans


def forged_fields(header: bytes, our_id: str) -> list[tuple[int, int]]:
    """The spans of Authentication-Results fields in `header` that carry `our_id`."""
    ours = our_id.lower().encode("ascii", "replace")
    found = []
    for start, end in _fields(header):
        m = _FIELD_NAME.match(header, start, end)
        if m is None:
            continue
        value = header[m.end() : end]
        claimed = authserv_id(value)
        if claimed is not None and claimed.lower() == ours:
            found.append((start, end))
    return found


def strip_fields(data: bytes, spans: Sequence[tuple[int, int]]) -> bytes:
    """`data` without the byte ranges `spans` (sorted, not overlapping)."""
    out = []
    pos = 0
    for start, end in spans:
        out.append(data[pos:start])
        pos = end
    out.append(data[pos:])
    return b"".join(out)
