"""The envelope record every role exchanges: sender, recipients and their ESMTP options.

Small, frozen and serialisable (to/from plain dicts), so that receive, queue, scheduler and
delivery can later live in different processes without a rewrite. Addresses are stored as the
client gave them inside `<>` (the null sender is the empty string).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True, slots=True)
class RecipientSpec:
    """One envelope recipient with its DSN options (RFC 3461 §4.1, §4.2)."""

    address: str
    #: NOTIFY= values ("SUCCESS", "FAILURE", "DELAY") or ("NEVER",); empty: not given.
    notify: tuple[str, ...] = ()
    #: ORCPT= as (addr-type, xtext-decoded address), e.g. ("rfc822", "a@b"); None: not given.
    orcpt: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Envelope:
    """What SMTP (or sendmail) said about one message, independent of its bytes."""

    sender: str
    recipients: tuple[RecipientSpec, ...]
    #: BODY= (RFC 6152 / RFC 3030): "7BIT", "8BITMIME" or "BINARYMIME".
    body_type: str = "7BIT"
    smtputf8: bool = False
    #: RET= (RFC 3461 §4.3): "FULL", "HDRS" or None.
    dsn_ret: str | None = None
    #: ENVID= (RFC 3461 §4.4), xtext-decoded.
    dsn_envid: str | None = None
    #: SIZE= declared by the client (RFC 1870), for information only.
    declared_size: int | None = None
    #: Who handed it to us: for Received: and logs.
    client_name: str = ""
    client_address: str = ""
    helo: str = ""
    protocol: str = "ESMTP"
    auth_user: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        # By hand, not dataclasses.asdict: this runs once per queued message and asdict's
        # recursive deep copy showed in profiles.
        data = {f: getattr(self, f) for f in _FIELDS}
        data["recipients"] = [
            {
                "address": r.address,
                "notify": list(r.notify),
                "orcpt": list(r.orcpt) if r.orcpt else None,
            }
            for r in self.recipients
        ]
        data["extra"] = dict(self.extra)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Envelope:
        rcpts = tuple(
            RecipientSpec(
                address=r["address"],
                notify=tuple(r.get("notify") or ()),
                orcpt=(r["orcpt"][0], r["orcpt"][1]) if r.get("orcpt") else None,
            )
            for r in data["recipients"]
        )
        fields = {k: v for k, v in data.items() if k != "recipients"}
        return cls(recipients=rcpts, **fields)


_FIELDS = tuple(f.name for f in fields(Envelope))
