"""DNS block and allow lists: postscreen-style weighted scores (pure; lookups in `dnsbl_lookup`).

In: the sites (`net.dnslist.Site`, parsed from postscreen's `zone[=filter][*weight]` syntax,
e.g. `zen.example=127.0.0.[2..11]*3` or `list.dnswl.example=127.0.[0..255].[1..3]*-2`), and
per client the A records each zone answered for it. Out: a `Score`: the sum of the weights of
the sites that list the client (allow lists have negative weights), the site to name in the
reply, and the answers that were ignored. Several sites may share a zone with different
filters and weights (one query answers them all).

Which answers count (RFC 5782 §2.3: list entries are A records in 127.0.0.0/8):
- an answer outside 127.0.0.0/8 is never a listing (a hijacked or wildcarded zone, a DNS
  provider's "search page"): it is ignored and reported;
- with a filter, only answers it matches count;
- without one, any 127/8 answer counts except 127.255.255.0/24, where lists such as
  Spamhaus's say "query refused" (e.g. through a public resolver), not "listed".

SECURITY: the zones answer for addresses and domains the client controls; an answer is only
compared with the filter, never used as a name or logged without being an IPv4 address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from mailhaven.net.dnslist import LIST_NETWORK, Site


@dataclass(frozen=True, slots=True)
class Score:
    """The sum of the weights of the sites that list the client, and the heaviest of them."""

    total: int = 0
    named: str | None = None  # the zone to name in a rejection
    listed: tuple[str, ...] = ()  # every zone that listed it, for the log
    ignored: tuple[str, ...] = ()  # "zone: 10.0.0.1" answers outside 127/8

    def blocks(self, threshold: int) -> bool:
        return self.named is not None and self.total >= threshold


def score(sites: Sequence[Site], answers: Mapping[str, Iterable[str]]) -> Score:
    """Score the `answers` (zone -> the A records it gave; a site that failed is absent)."""
    total, best, listed, ignored = 0, None, [], []
    for site in sites:
        hits = False
        for text in answers.get(site.zone, ()):
            try:
                answer = ipaddress.IPv4Address(text)
            except ValueError:
                continue
            if answer not in LIST_NETWORK:
                ignored.append(f"{site.zone}: {answer}")
            elif site.matches(answer):
                hits = True
        if hits:
            total += site.weight
            listed.append(site.zone)
            if site.weight > 0 and (best is None or site.weight > best.weight):
                best = site
    return Score(total, best.zone if best else None, tuple(listed), tuple(ignored))
