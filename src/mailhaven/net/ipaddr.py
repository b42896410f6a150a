"""A client's IP address as every check compares it: one parse, one rule.

A dual-stack listener sees IPv4 clients as IPv4-mapped IPv6 addresses (`::ffff:192.0.2.1`), and
a link-local address may carry a zone (`fe80::1%eth0`); networks, DNS lists, SPF (RFC 7208 §5),
greylisting and the trusted networks must all see the plain IPv4 address, so they all go
through `client_ip`.
"""

from __future__ import annotations

import functools
import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=4096)
def client_ip(text: str) -> IPAddress | None:
    """`text` as an address, an IPv4-mapped IPv6 one as IPv4, a zone dropped; None if it is
    not an address. Cached: each message asks several times for the same client (routing,
    signing, the checks), the same senders come back, and the result is immutable."""
    try:
        ip = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
