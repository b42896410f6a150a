"""Run Let's Encrypt's `pebble` (a real ACME CA for tests, Debian package `pebble`) on loopback.

    with Pebble(tmp_path, http_port=port, dns=dns_server.address) as ca:
        ca.directory        # https://127.0.0.1:<port>/dir
        ca.ca_bundle        # PEM that verifies pebble's own HTTPS (made here with trustme)
        ca.root_pem()       # the root that issued certificates chain up to (new every start)

or `AcmeCA(tmp_path, "mail.example.test")`: pebble, a DNS server that resolves the domain to
127.0.0.1, and `acme_table()`, the `[tls] acme` settings for ordering it from there.

Pebble validates HTTP-01 at `http_port` of 127.0.0.1 (its `httpPort`; TLS-ALPN-01 at
`tls_port`, its `tlsPort`) after resolving the
domain through `-dnsserver` (our loopback test DNS server), never through the real DNS.
`PEBBLE_VA_NOSLEEP=1` skips its artificial validation delays and `PEBBLE_WFE_NONCEREJECT=0`
its deliberate bad-nonce rejections, so runs are deterministic. Started and stopped by PID;
`stop()` then `start()` again simulates a CA that is down for a while.

SECURITY: test code only; every listener binds 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import trustme
from tests.support.dns_server import DNSServer
from tests.support.server import free_port, port_accepts

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"
#: The name the `acme_ca` fixture (tests/conftest.py) orders for; resolves to 127.0.0.1.
DOMAIN = "mail.example.test"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0


def available() -> bool:
    return os.access(PEBBLE, os.X_OK)


class Pebble:
    def __init__(self, base: Path, *, http_port: int, dns: tuple[str, int],
                 tls_port: int = 0) -> None:
        self.base = base / "pebble"
        self.base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.management_port = free_port()
        self.http_port = http_port
        self.tls_port = tls_port or free_port()
        self.dns = dns
        self.proc: subprocess.Popen[bytes] | None = None
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        cert.private_key_pem.write_to_path(str(self.base / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(self.base / "cert.pem"))
        self.ca_bundle = self.base / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_bundle))
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.port}",
                "managementListenAddress": f"127.0.0.1:{self.management_port}",
                "certificate": str(self.base / "cert.pem"),
                "privateKey": str(self.base / "key.pem"),
                "httpPort": http_port,
                "tlsPort": self.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        self.config_path = self.base / "pebble-config.json"
        self.config_path.write_text(json.dumps(config))
        self.log_path = self.base / "pebble.log"

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def start(self) -> Pebble:
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [PEBBLE, "-config", str(self.config_path),
                 "-dnsserver", f"{self.dns[0]}:{self.dns[1]}"],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.base,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not port_accepts("127.0.0.1", self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("pebble did not start:\n" + self.log_path.read_text())
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)

    def root_pem(self) -> str:
        """Pebble's current root certificate (management interface, `/roots/0`)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_bundle))
        url = f"https://127.0.0.1:{self.management_port}/roots/0"
        with urllib.request.urlopen(url, context=ctx, timeout=10) as answer:
            return bytes(answer.read()).decode()

    def __enter__(self) -> Pebble:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class AcmeCA:
    """Pebble with its own loopback DNS server answering A 127.0.0.1 for `domain`."""

    def __init__(self, base: Path, domain: str) -> None:
        self.domain = domain
        self.http_port = free_port()
        self.tls_port = free_port()
        self.dns = DNSServer({domain: {"A": ["127.0.0.1"]}}).start()
        try:
            self.pebble = Pebble(base, http_port=self.http_port, dns=self.dns.address,
                                 tls_port=self.tls_port).start()
        except BaseException:
            self.dns.stop()
            raise

    def acme_table(self, **override: Any) -> dict[str, Any]:
        """`[tls] acme` settings that order `domain` from this CA."""
        table: dict[str, Any] = {
            "domains": [self.domain],
            "directory": self.pebble.directory,
            "email": "postmaster@example.test",
            "http01_listen": f"127.0.0.1:{self.http_port}",
            "directory_ca": str(self.pebble.ca_bundle),
        }
        return table | override

    def stop(self) -> None:
        self.pebble.stop()
        self.dns.stop()
