"""A private OpenDKIM (Debian's) on loopback as a signing milter, for end-to-end tests.

`OpenDKIMInstance(domain, selector).start()` makes a key with `opendkim-genkey` in a fresh
`/tmp/mailhaven-opendkim-*` directory, writes an `opendkim.conf` there (Mode s, the one domain
and selector, relaxed/simple, InternalHosts 127.0.0.1, no syslog) and runs `opendkim -f` on
127.0.0.1:<free port>. `txt_record` is the public key as DNS would publish it, for a verifier.
`stop()` SIGTERMs the PID it started (SIGKILL only if it outlives the wait).

`RequireSafeKeys false`: the key lives under /tmp, which OpenDKIM otherwise refuses.

SECURITY: test code only; binds 127.0.0.1.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from tests.fakes import free_port

OPENDKIM = Path("/usr/sbin/opendkim")
GENKEY = Path("/usr/sbin/opendkim-genkey")
START_TIMEOUT = 20.0


def skip_reason() -> str | None:
    for path in (OPENDKIM, GENKEY):
        if not path.exists():
            return f"{path} is missing (opendkim, opendkim-tools: scripts/install-test-deps)"
    return None


class OpenDKIMInstance:
    def __init__(self, domain: str, selector: str = "test") -> None:
        self.domain, self.selector = domain, selector
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="mailhaven-opendkim-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def spec(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    @property
    def txt_record(self) -> bytes:
        """The selector's TXT record data (the quoted strings of test.txt joined)."""
        text = (self.dir / f"{self.selector}.txt").read_text()
        return "".join(text.split('"')[1::2]).encode()

    def start(self) -> OpenDKIMInstance:
        subprocess.run(
            [str(GENKEY), "-b", "1024", "-d", self.domain, "-s", self.selector, "-D", str(self.dir)],
            check=True, timeout=60, capture_output=True,
        )
        conf = self.dir / "opendkim.conf"
        conf.write_text(
            "Syslog no\nLogWhy yes\nMode s\nBackground no\nRequireSafeKeys false\n"
            f"Domain {self.domain}\nSelector {self.selector}\n"
            f"KeyFile {self.dir / (self.selector + '.private')}\n"
            f"Socket inet:{self.port}@127.0.0.1\nPidFile {self.dir / 'opendkim.pid'}\n"
            "Canonicalization relaxed/simple\nInternalHosts 127.0.0.1\n"
        )
        self._out = open(self.dir / "out.txt", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(OPENDKIM), "-f", "-x", str(conf)], stdout=self._out, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"opendkim exited: {(self.dir / 'out.txt').read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("opendkim did not start listening in time")

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            self._out.close()
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> OpenDKIMInstance:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
