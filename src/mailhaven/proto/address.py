"""Envelope addresses and ESMTP parameters: the RFC 5321 §4.1.2 grammar, parsed by hand.

Input is the argument text of `MAIL FROM:` / `RCPT TO:` as the client sent it; output is either a
parsed value or a `Reply` saying exactly what is wrong (501 syntax, 553 mailbox syntax, 555
parameters). Pure functions, no I/O.

Choices (like Postfix with `strict_rfc821_envelopes = no`): a space after the colon and an address
without `<>` are tolerated, because people type at us over telnet; a source route
(`<@a,@b:user@c>`) is accepted and dropped as RFC 5321 §4.1.2 allows, never used for routing.
Non-ASCII is allowed only when the transaction declared SMTPUTF8 (RFC 6531 §3.3).

Limits (RFC 5321 §4.5.3.1): local part 64 octets, domain 255, path 256 (with the brackets).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mailhaven.proto import replies as r
from mailhaven.proto.replies import Reply

#: RFC 5321 §4.5.3.1.1
MAX_LOCAL_PART = 64
#: RFC 5321 §4.5.3.1.2
MAX_DOMAIN = 255
#: RFC 5321 §4.5.3.1.3 (counts the angle brackets)
MAX_PATH = 256
#: RFC 3461 §4.4: ENVID is at most 100 characters.
MAX_ENVID = 100

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_ATEXT_UTF8 = r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[^\x00-\x7f])"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
_DOT_STRING_UTF8 = re.compile(rf"{_ATEXT_UTF8}+(?:\.{_ATEXT_UTF8}+)*\Z")
# qtextSMTP = %d32-33 / %d35-91 / %d93-126 ; quoted-pairSMTP = "\" %d32-126
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_QUOTED_UTF8 = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|[^\x00-\x7f]|\\[\x20-\x7e])*"\Z')
_SUBDOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\Z")
_SUBDOMAIN_UTF8 = re.compile(
    r"(?:[A-Za-z0-9]|[^\x00-\x7f])(?:(?:[A-Za-z0-9-]|[^\x00-\x7f])*(?:[A-Za-z0-9]|[^\x00-\x7f]))?\Z"
)
_IPV4 = re.compile(r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}\Z")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_XTEXT_HEX = re.compile(r"\+([0-9A-F]{2})")


class AddressError(ValueError):
    """Raised inside this module only; public functions turn it into a Reply."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.one_line())
        self.reply = reply


def is_valid_domain(domain: str, *, utf8: bool = False) -> bool:
    """RFC 5321 Domain or address-literal (`[1.2.3.4]`, `[IPv6:...]`)."""
    if not domain or len(domain.encode("utf-8")) > MAX_DOMAIN:
        return False
    if domain.startswith("["):
        return _is_address_literal(domain)
    pattern = _SUBDOMAIN_UTF8 if utf8 else _SUBDOMAIN
    return all(pattern.match(label) for label in domain.split("."))


def _is_address_literal(text: str) -> bool:
    if not (text.startswith("[") and text.endswith("]")):
        return False
    inner = text[1:-1]
    if _IPV4.match(inner):
        return True
    if inner[:5].lower() == "ipv6:":
        import ipaddress  # pure computation, no I/O

        try:
            ipaddress.IPv6Address(inner[5:])
        except ValueError:
            return False
        return True
    return False


def is_valid_local_part(local: str, *, utf8: bool = False) -> bool:
    """Dot-string or Quoted-string (RFC 5321 §4.1.2; RFC 6531 §3.3 with utf8)."""
    if not local:
        return False
    if local.startswith('"'):
        return bool((_QUOTED_UTF8 if utf8 else _QUOTED).match(local))
    return bool((_DOT_STRING_UTF8 if utf8 else _DOT_STRING).match(local))


def split_mailbox(mailbox: str) -> tuple[str, str]:
    """Split `local@domain` at the last `@` outside a quoted local part."""
    if mailbox.startswith('"'):
        end = _closing_quote(mailbox)
        if end < 0 or end + 1 >= len(mailbox) or mailbox[end + 1] != "@":
            raise AddressError(r.BAD_ADDRESS_SYNTAX)
        return mailbox[: end + 1], mailbox[end + 2 :]
    local, sep, domain = mailbox.rpartition("@")
    if not sep:
        raise AddressError(r.BAD_ADDRESS_SYNTAX)
    return local, domain


def _closing_quote(text: str) -> int:
    i = 1
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == '"':
            return i
        i += 1
    return -1


def _check_mailbox(mailbox: str, *, utf8: bool, allow_bare_postmaster: bool) -> str:
    if allow_bare_postmaster and mailbox.lower() == "postmaster":
        return mailbox
    local, domain = split_mailbox(mailbox)
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError(r.LOCAL_PART_TOO_LONG)
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise AddressError(r.DOMAIN_TOO_LONG)
    if not is_valid_local_part(local, utf8=utf8) or not is_valid_domain(domain, utf8=utf8):
        raise AddressError(r.BAD_ADDRESS_SYNTAX)
    return mailbox


def _split_path(arg: str) -> tuple[str, str]:
    """Return (path text including <> or bare address, rest of the line with the parameters)."""
    arg = arg.lstrip(" ")
    if not arg.startswith("<"):
        # Tolerated form without brackets: up to the first space.
        path, _, rest = arg.partition(" ")
        return path, rest
    i = 1
    in_quote = False
    while i < len(arg):
        ch = arg[i]
        if in_quote:
            if ch == "\\":
                i += 2
                continue
            if ch == '"':
                in_quote = False
        elif ch == '"':
            in_quote = True
        elif ch == ">":
            return arg[: i + 1], arg[i + 1 :]
        i += 1
    raise AddressError(r.MISSING_CLOSING_BRACKET)


def parse_path(
    arg: str, *, null_ok: bool, utf8: bool, bare_postmaster_ok: bool = False
) -> tuple[str, str]:
    """Parse `<path> [params]`; return (mailbox, parameter text). Raises AddressError."""
    path, rest = _split_path(arg)
    if not path:
        raise AddressError(r.PATH_SYNTAX)
    if len(path.encode("utf-8")) > MAX_PATH:
        raise AddressError(r.PATH_TOO_LONG)
    inner = path[1:-1] if path.startswith("<") else path
    if inner == "":
        if null_ok:
            return "", rest
        raise AddressError(r.NULL_ADDRESS_NOT_ALLOWED)
    if inner.startswith("@"):
        # A-d-l ":" Mailbox: a source route, accepted and ignored (RFC 5321 §4.1.2, §C).
        route, colon, mailbox = inner.partition(":")
        hops = route.split(",")
        if not colon or not all(h.startswith("@") and is_valid_domain(h[1:]) for h in hops):
            raise AddressError(r.BAD_SOURCE_ROUTE)
        inner = mailbox
    return _check_mailbox(inner, utf8=utf8, allow_bare_postmaster=bare_postmaster_ok), rest


@dataclass(frozen=True, slots=True)
class MailParams:
    """Parsed MAIL FROM parameters (RFC 1870, 6152, 6531, 3461, 4954)."""

    size: int | None = None
    body: str = "7BIT"
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    auth: str | None = None


@dataclass(frozen=True, slots=True)
class RcptParams:
    """Parsed RCPT TO parameters (RFC 3461 §4.1, §4.2)."""

    notify: tuple[str, ...] = ()
    orcpt: tuple[str, str] | None = None


def split_params(text: str) -> list[tuple[str, str | None]]:
    """`esmtp-param *(SP esmtp-param)` into (KEYWORD, value or None)."""
    out: list[tuple[str, str | None]] = []
    for item in text.split():
        key, eq, value = item.partition("=")
        if not _KEYWORD.match(key) or (eq and not value):
            raise AddressError(r.bad_parameter_syntax(item))
        out.append((key.upper(), value if eq else None))
    return out


def xtext_decode(text: str) -> str:
    """RFC 3461 §4: `+XX` hex escapes; other characters must be printable ASCII except `+ =`."""
    if any(c in "=" or not ("!" <= c <= "~") for c in text):
        raise AddressError(r.BAD_XTEXT)
    if "+" in _XTEXT_HEX.sub("", text):
        raise AddressError(r.BAD_XTEXT)
    return _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), text)


def xtext_encode(text: str) -> str:
    """Inverse of xtext_decode, for passing ORCPT/ENVID on to the next hop."""
    return "".join(c if ("!" <= c <= "~" and c not in "+=") else f"+{ord(c):02X}" for c in text)


def parse_mail_params(text: str, *, extensions: frozenset[str]) -> MailParams:
    """Validate MAIL parameters against what we advertised. Raises AddressError."""
    size: int | None = None
    body = "7BIT"
    smtputf8 = False
    ret: str | None = None
    envid: str | None = None
    auth: str | None = None
    seen: set[str] = set()
    for key, value in split_params(text):
        if key in seen:
            raise AddressError(r.duplicate_parameter(key))
        seen.add(key)
        if key == "SIZE" and "SIZE" in extensions:
            if value is None or not value.isdigit() or len(value) > 20:
                raise AddressError(r.BAD_SIZE)
            size = int(value)
        elif key == "BODY" and "8BITMIME" in extensions:
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise AddressError(r.BAD_BODY)
            body = value.upper()
        elif key == "SMTPUTF8" and "SMTPUTF8" in extensions:
            if value is not None:
                raise AddressError(r.SMTPUTF8_TAKES_NO_VALUE)
            smtputf8 = True
        elif key == "RET" and "DSN" in extensions:
            if value is None or value.upper() not in ("FULL", "HDRS"):
                raise AddressError(r.BAD_RET)
            ret = value.upper()
        elif key == "ENVID" and "DSN" in extensions:
            envid = xtext_decode(value or "")
            if not envid or len(value or "") > MAX_ENVID:
                raise AddressError(r.BAD_ENVID)
        elif key == "AUTH" and "AUTH" in extensions:
            auth = value  # RFC 4954 §5: informational; we never trust it.
        else:
            raise AddressError(r.unsupported_parameter("MAIL", key))
    return MailParams(size, body, smtputf8, ret, envid, auth)


_NOTIFY_WORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})


def parse_rcpt_params(text: str, *, extensions: frozenset[str]) -> RcptParams:
    """Validate RCPT parameters (only DSN's NOTIFY and ORCPT exist). Raises AddressError."""
    notify: tuple[str, ...] = ()
    orcpt: tuple[str, str] | None = None
    seen: set[str] = set()
    for key, value in split_params(text):
        if key in seen:
            raise AddressError(r.duplicate_parameter(key))
        seen.add(key)
        if key == "NOTIFY" and "DSN" in extensions:
            words = tuple(w.upper() for w in (value or "").split(","))
            valid_list = all(w in _NOTIFY_WORDS for w in words) and len(set(words)) == len(words)
            if words != ("NEVER",) and not valid_list:
                raise AddressError(r.BAD_NOTIFY)
            notify = words
        elif key == "ORCPT" and "DSN" in extensions:
            addr_type, semi, addr = (value or "").partition(";")
            if not semi or not _KEYWORD.match(addr_type) or not addr:
                raise AddressError(r.BAD_ORCPT)
            if addr_type.lower() == "utf-8":
                decoded = addr  # RFC 6533 utf-8-addr-xtext: kept as sent
            else:
                decoded = xtext_decode(addr)
            orcpt = (addr_type.lower(), decoded)
        else:
            raise AddressError(r.unsupported_parameter("RCPT", key))
    return RcptParams(notify, orcpt)
