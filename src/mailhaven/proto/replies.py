"""SMTP replies as values (RFC 5321 §4.2, enhanced status codes RFC 3463).

A `Reply` is what every role hands back: the server core sends them, delivery agents return one
per recipient, the scheduler records them. Expected outcomes are values, not exceptions.

Serialisation follows RFC 5321 §4.2.1: every line but the last carries `code-text`, the last
`code text`. When ENHANCEDSTATUSCODES is in force (RFC 2034) the enhanced code is repeated at the
start of every line's text.

Where a reply came from: `answered` is set only on replies a peer sent us (by the SMTP client
core, `proto.smtp_client`) and names what they answered: "greeting" or the command ("EHLO",
"MAIL FROM", "RCPT TO", "DATA", "end of DATA", ...). Replies we make up ourselves (connection
refused, DNS failure, "delivered to maildir") leave it None. Logs use it to tell "host H said:
550 ..." from our own words, as Postfix's smtp(8) does; it takes no part in equality.

One constructor, one argument order everywhere: `Reply(code, text, enhanced, more)` (the
optional parts last). The texts mailhaven's own protocol cores send live in the catalogue at the
end of this module, so a reply can be found by its words.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets including CRLF.
MAX_REPLY_LINE = 512


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: a three-digit code, an optional enhanced code and one or more lines."""

    code: int
    text: str = ""
    enhanced: str | None = None
    more: tuple[str, ...] = ()
    #: What a peer's reply answered ("greeting", "RCPT TO", ...); None when we made it up.
    answered: str | None = field(default=None, compare=False)

    @property
    def lines(self) -> tuple[str, ...]:
        return (self.text, *self.more)

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 300

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    @property
    def dsn(self) -> str:
        """The RFC 3463 status for logs (`dsn=X.Y.Z`), derived from the code when absent."""
        if self.enhanced:
            return self.enhanced
        return f"{self.code // 100}.0.0"

    def to_bytes(self, enhanced_codes: bool = True) -> bytes:
        """Serialise with `-` continuation lines and CRLF endings."""
        prefix = f"{self.enhanced} " if (enhanced_codes and self.enhanced) else ""
        if not self.more:  # the common case, without the loop below
            text = f"{prefix}{self.text}" if self.text or prefix else ""
            return (f"{self.code} {text}".rstrip(" ") + "\r\n").encode("utf-8", "replace")
        lines = self.lines
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            text = f"{prefix}{line}" if line or prefix else ""
            out.append(f"{self.code}{sep}{text}".rstrip(" ") + "\r\n")
        return "".join(out).encode("utf-8", "replace")

    def one_line(self) -> str:
        """A single-line rendering for logs: `550 5.1.1 text`."""
        parts = [str(self.code)]
        if self.enhanced:
            parts.append(self.enhanced)
        parts.append(" ".join(x for x in self.lines if x))
        return " ".join(p for p in parts if p)

