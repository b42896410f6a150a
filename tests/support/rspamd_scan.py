"""A private rspamd on loopback that scans over HTTP with chosen checks on: rspamd as a verifier.

`RspamdScanner(nameserver, enable=("dkim", "arc")).start()` is `tests.support.rspamd`'s
instance (own LOCAL_CONFDIR under /tmp, DNS only to the loopback `nameserver`, the network
modules off) plus:
- a `normal` worker on 127.0.0.1:<free port> (`http_port`), which answers rspamd's HTTP
  protocol (`POST /checkv2`, what `rspamc` uses);
- the modules named in `enable` switched back on, with `check_local`/`check_authed` so a
  message is checked whatever client address the request names.

`scan(message, ip=...)` posts a message and returns rspamd's JSON answer; `symbols(...)` just
the names of the symbols it matched (e.g. `R_DKIM_ALLOW`, `R_DKIM_REJECT`, `ARC_ALLOW`).

rspamd takes ~20-30 s to start: one instance per test module. Stopping is the base class's
(SIGTERM to the PID it started, SIGKILL to that PID only after a wait).

SECURITY: test code only; binds 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import time
import urllib.request
from collections.abc import Iterable
from typing import Any

from tests.fakes import free_port
from tests.support import rspamd
from tests.support.rspamd import RspamdInstance

#: Seconds one scan may take (rspamd's own DNS timeout is 0.5 s with one retransmit).
SCAN_TIMEOUT = 30.0


class RspamdScanner(RspamdInstance):
    def __init__(self, nameserver: tuple[str, int], enable: Iterable[str] = ("dkim",)) -> None:
        super().__init__(nameserver)
        self.enable = tuple(enable)
        self.http_port = free_port()

    def _write_config(self) -> None:
        super()._write_config()
        d = self.dir
        written = [d / "override.d" / "worker-normal.inc"]
        written[0].write_text(f'bind_socket = "127.0.0.1:{self.http_port}";\ncount = 1;\n')
        for module in self.enable:
            (d / "override.d" / f"{module}.conf").unlink(missing_ok=True)
            path = d / "local.d" / f"{module}.conf"
            path.write_text("check_local = true;\ncheck_authed = true;\n")
            written.append(path)
        user = pwd.getpwnam(rspamd.USER)
        for path in written:
            os.chown(path, user.pw_uid, user.pw_gid)

    def start(self) -> RspamdScanner:
        super().start()
        deadline = time.monotonic() + rspamd.START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.http_port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("rspamd's normal worker did not start listening in time")

    def scan(self, message: bytes, *, ip: str = "192.0.2.25", helo: str = "client.test",
             sender: str = "", rcpt: str = "rcpt@dest.test") -> dict[str, Any]:
        """rspamd's verdict on `message` as if `ip` had sent it (HTTP `/checkv2`)."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/checkv2", data=message, method="POST",
            headers={"IP": ip, "Helo": helo, "From": sender, "Rcpt": rcpt},
        )
        with urllib.request.urlopen(request, timeout=SCAN_TIMEOUT) as answer:
            result: dict[str, Any] = json.loads(answer.read())
        return result

    def symbols(self, message: bytes, **kw: str) -> set[str]:
        return set(self.scan(message, **kw).get("symbols", {}))
