"""Greylisting policy (RFC 6647): pure decisions over (client, sender, recipient) triplets.

In: a triplet's stored `Entry` (or None), the client's auto-allow count, `now` (wall-clock
seconds: entries outlive restarts) and the settings. Out: a `Decision` and the entries to store.

The practice RFC 6647 §2.1-2.3 and §4 describe, as postgrey does it:
- a triplet never seen (or not retried within `retry_window`) is answered 4xx and remembered;
- a retry before `delay` has passed is answered 4xx again, without restarting the delay
  (§4.2: restarting punishes fast, well-behaved retry schedules);
- a retry after `delay` passes; the triplet is then allowed for `allow_lifetime` after its
  last use, and the client's count of correct retries grows: at `auto_allow_after` (postgrey's
  --auto-whitelist-clients) the client itself passes without delay (§4.3 "automatic
  allow-listing"), for `allow_lifetime` after its last message.
The client is keyed by network, not address (§4.1: a sending farm retries from a sibling
address): IPv4 /24, IPv6 /64. Addresses are compared lower-cased; a BATV-tagged sender
(`prvs=tag=user@domain`, a new tag per message) is keyed without its tag, else it could never
match its own retry.

Bounded: `GreylistStore` keeps at most `max_entries` triplets and expires the rest by these
rules (see `expired`).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from mailhaven.net.ipaddr import client_ip

#: RFC 6647 §4.2: delays of 1 to 25 minutes are common; postgrey's default is 300 s.
DEFAULT_DELAY = 300.0
#: How long an unretried triplet waits for its retry (postgrey --max-age covers allowed
#: ones; RFC 5321 §4.5.4.1 retries for 4-5 days, but most MTAs retry within hours).
DEFAULT_RETRY_WINDOW = 2 * 86400.0
#: postgrey --max-age = 35 days: an allowed triplet or client unused this long is forgotten.
DEFAULT_ALLOW_LIFETIME = 35 * 86400.0
#: postgrey --auto-whitelist-clients = 5; one is enough to show a real MTA.
DEFAULT_AUTO_ALLOW_AFTER = 1
DEFAULT_MAX_ENTRIES = 200_000

_BATV = re.compile(r"^prvs=[^=@]+=(.+@.*)$", re.I)


@dataclass(frozen=True, slots=True)
class GreylistSettings:
    delay: float = DEFAULT_DELAY
    retry_window: float = DEFAULT_RETRY_WINDOW
    allow_lifetime: float = DEFAULT_ALLOW_LIFETIME
    auto_allow_after: int = DEFAULT_AUTO_ALLOW_AFTER  # 0: clients are never auto-allowed
    max_entries: int = DEFAULT_MAX_ENTRIES


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored triplet: when it was first and last seen, and whether it has passed."""

    first_seen: float
    last_seen: float
    passed: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    passed: bool
    #: seconds the client still has to wait (when not passed)
    wait: float = 0.0
    #: why, for the log: "new", "early retry", "retried", "known", "client allowed"
    reason: str = ""
    #: this retry was the triplet's first pass: count it for the client's auto-allow
    first_pass: bool = False


def client_key(address: str) -> str:
    """The network a client is greylisted as (RFC 6647 §4.1): IPv4 /24, IPv6 /64."""
    ip = client_ip(address)
    if ip is None:
        return address
    prefix = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def sender_key(sender: str) -> str:
    text = sender.lower()
    batv = _BATV.match(text)
    return batv.group(1) if batv else text


def triplet_key(client: str, sender: str, recipient: str) -> str:
    return f"{client_key(client)} {sender_key(sender)} {recipient.lower()}"


def decide(entry: Entry | None, now: float, settings: GreylistSettings) -> tuple[Decision, Entry]:
    """The decision for one triplet and the entry to store in its place."""
    if entry is not None and entry.passed and now - entry.last_seen <= settings.allow_lifetime:
        return Decision(True, reason="known"), Entry(entry.first_seen, now, True)
    if entry is None or entry.passed or now - entry.first_seen > settings.retry_window:
        return Decision(False, settings.delay, "new"), Entry(now, now)
    waited = now - entry.first_seen
    if waited < settings.delay:
        wait = settings.delay - waited
        return Decision(False, wait, "early retry"), Entry(entry.first_seen, now)
    return Decision(True, reason="retried", first_pass=True), Entry(entry.first_seen, now, True)


def client_allowed(passes: int, last_seen: float, now: float, settings: GreylistSettings) -> bool:
    """Has the client retried correctly often enough, recently enough, to skip the delay?"""
    return (
        settings.auto_allow_after > 0
        and passes >= settings.auto_allow_after
        and now - last_seen <= settings.allow_lifetime
    )


def expired(entry: Entry, now: float, settings: GreylistSettings) -> bool:
    """An entry the store may forget: nothing `decide` would use it for any more."""
    if entry.passed:
        return now - entry.last_seen > settings.allow_lifetime
    return now - entry.first_seen > settings.retry_window
