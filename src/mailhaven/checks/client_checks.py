"""Client checks: the client's verified name and its HELO (`[checks.client]`).

In: the settings, the client's name as `net.client_names` verified it (`unknown` when it has
none), its address, its HELO argument and our own names. Out: None or the `Reply` to refuse
its recipients with (checked at RCPT TO, as Postfix does with smtpd_delay_reject = yes, so the
client sees a reply it can log and we log sender and recipient).

- `reject_unknown_client`: no verified name (Postfix reject_unknown_client_hostname). Answered
  with 450 4.7.25 (Postfix's unknown_client_reject_code = 450): reverse DNS fails for
  legitimate hosts, temporarily or by an owner's neglect, and a 4xx lets a sysadmin fix it.
  Off by default: many small legitimate servers have no matching PTR record.
- `reject_non_fqdn_helo`: HELO is not a fully qualified domain name or address literal
  (reject_non_fqdn_helo_hostname, 504 5.5.2). Off by default: clients behind NAT send
  their machine's short name.
- `reject_own_helo`: HELO claims to be us (our host name, a local domain, or our listening
  address as a literal): only spam software does that. On by default; trusted and
  authenticated clients are never checked, nor a client connecting from the very address it
  connects to (a program on this host), which says the truth when it names us.

Pure and synchronous. SECURITY: the HELO argument is the client's word; it is only compared
and quoted (the SMTP core already bounded its length and charset).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection
from dataclasses import dataclass

from mailhaven.proto import replies as r
from mailhaven.proto.replies import Reply


@dataclass(frozen=True, slots=True)
class ClientCheckSettings:
    reject_unknown_client: bool = False
    reject_non_fqdn_helo: bool = False
    reject_own_helo: bool = True
    #: our host name and local domains, lower case (what a client must not claim to be)
    own_names: frozenset[str] = frozenset()

    @property
    def enabled(self) -> bool:
        return self.reject_unknown_client or self.reject_non_fqdn_helo or self.reject_own_helo


def _literal(helo: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address in an address literal `[192.0.2.1]` / `[IPv6:2001:db8::1]`, else None."""
    if not (helo.startswith("[") and helo.endswith("]")):
        return None
    text = helo[1:-1]
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def is_fqdn(helo: str) -> bool:
    """A dotted name with a non-numeric top label, or an address literal (RFC 5321 §4.1.4)."""
    if _literal(helo) is not None:
        return True
    name = helo.rstrip(".")
    labels = name.split(".")
    return len(labels) > 1 and all(labels) and not labels[-1].isdigit()


def claims_to_be_us(helo: str, own_names: Collection[str], own_addresses: Collection[str]) -> bool:
    name = helo.rstrip(".").lower()
    if name in own_names:
        return True
    if not own_addresses or not (name[:1].isdigit() or name[:1] in "[:"):
        return False  # not an address: no parsing (this runs at every RCPT TO)
    literal = _literal(helo)
    if literal is None:
        # a bare dotted address with our number, without brackets, counts too
        try:
            literal = ipaddress.ip_address(name)
        except ValueError:
            return False
    return any(str(literal) == a for a in own_addresses if a)


def check_client(
    settings: ClientCheckSettings,
    *,
    client_ip: str,
    client_name: str,
    helo: str,
    own_addresses: Collection[str] = (),
) -> Reply | None:
    """The first check the client fails, or None (see the module docstring)."""
    if settings.reject_unknown_client and client_name == "unknown":
        return r.unknown_client_hostname(client_ip)
    own = settings.reject_own_helo and helo and client_ip not in own_addresses
    if own and claims_to_be_us(helo, settings.own_names, own_addresses):
        return r.helo_claims_to_be_us(helo)
    if settings.reject_non_fqdn_helo and not is_fqdn(helo):
        return r.helo_not_fqdn(helo)
    return None
