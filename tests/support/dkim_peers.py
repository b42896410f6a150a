"""Independent DKIM/ARC verifiers for tests, all asking the loopback DNS server only.

* `dkimpy_dns(server)`: a `dnsfunc` for dkimpy (`dkim.verify`, `dkim.arc_verify`) that looks
  TXT records up with dnspython at `server.address`;
* `opendkim_verify(message, server, workdir)`: OpenDKIM's own verifier (`opendkim -t`, the
  library the milter uses) with its resolver (libunbound) forwarding every query to
  `server.address` -- never the system's resolver. It reports the first signature's result.

SECURITY: test code only; OpenDKIM runs in test mode (`-t`): no milter socket, no daemon.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import dns.exception
import dns.nameserver
import dns.resolver
import pytest
from tests.support.dns_server import DNSServer


def dkimpy_dns(server: DNSServer) -> Callable[..., bytes | None]:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(*server.address)]
    resolver.lifetime = 5

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT", search=False)
        except dns.exception.DNSException:
            return None
        return b"".join(answer[0].strings)  # type: ignore[attr-defined,no-any-return]

    return lookup


def opendkim() -> str:
    path = shutil.which("opendkim") or ("/usr/sbin/opendkim"
                                        if Path("/usr/sbin/opendkim").exists() else None)
    if path is None:
        pytest.skip("opendkim is not installed (scripts/install-test-deps)")
    return path


def opendkim_verify(message: bytes, server: DNSServer, workdir: Path) -> str:
    """OpenDKIM's verdict line for the first signature of `message`."""
    workdir.mkdir(parents=True, exist_ok=True)
    host, port = server.address
    unbound = workdir / "unbound.conf"
    unbound.write_text(
        "server:\n  do-not-query-localhost: no\n  module-config: \"iterator\"\n"
        f"forward-zone:\n  name: \".\"\n  forward-addr: {host}@{port}\n"
    )
    conf = workdir / "opendkim.conf"
    conf.write_text(f"Mode v\nSyslog no\nResolverConfiguration {unbound}\n")
    path = workdir / "message.eml"
    path.write_bytes(message)
    done = subprocess.run([opendkim(), "-x", str(conf), "-t", str(path)], capture_output=True,
                          text=True, timeout=60, check=False)
    return done.stdout + done.stderr
