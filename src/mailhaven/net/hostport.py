"""`host:port` as written in the configuration: `127.0.0.1:2525`, `[::1]:2525`, `localhost:25`.

Here rather than in `config` because the network code (listeners, the ACME client) parses the
same strings, and `net` sits below `config` in the layers.
"""

from __future__ import annotations


class BadHostPort(ValueError):
    """Not `host:port` or `[v6addr]:port` with a port in 0-65535."""


def parse_hostport(text: str) -> tuple[str, int]:
    """`127.0.0.1:2525`, `[::1]:2525` or `localhost:25` -> (host, port)."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise BadHostPort(f"bad listen address {text!r}: expected host:port or [v6addr]:port")
    return host, int(port)
