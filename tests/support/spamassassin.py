"""A private SpamAssassin behind spamass-milter (Debian's) on loopback, for end-to-end tests.

`SpamAssassinMilter().start()` runs `spamd -L` (local tests only: no DNS, no network; the rules
Debian ships in /usr/share/spamassassin, GTUBE among them) on 127.0.0.1:<free port> as
`nobody`, without user configs, and `spamass-milter -r 5` (reject at score 5 or more; `reject`
changes it) on another loopback port, pointing its spamc at that spamd. `site_rules`: extra
SpamAssassin rules, in a copy of Debian's site config (`--siteconfigpath`). Both run in the foreground; `stop()` SIGTERMs
the two PIDs it started (SIGKILL only if one outlives the wait) and removes its directory.

SECURITY: test code only; both bind 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from tests.fakes import free_port

SPAMD = Path("/usr/sbin/spamd")
MILTER = Path("/usr/sbin/spamass-milter")
SPAMC = Path("/usr/bin/spamc")
START_TIMEOUT = 60.0
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def skip_reason() -> str | None:
    for path in (SPAMD, MILTER, SPAMC):
        if not path.exists():
            return f"{path} is missing (spamd, spamass-milter: scripts/install-test-deps)"
    if os.geteuid() != 0:
        return "spamd here starts as root and runs its children as nobody"
    return None


def _wait(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not start listening in time")


#: `SpamAssassinMilter(site_rules=JUNK_RULE, reject=15)`: a Subject containing `SPAM_MARK`
#: scores 10, spam (required_score 5) but below the milter's reject score: X-Spam-Flag: YES.
SPAM_MARK = "mailhaven-test-spam-marker"
JUNK_RULE = (
    f"header MH_TEST_SPAM Subject =~ /{SPAM_MARK}/i\n"
    "describe MH_TEST_SPAM mailhaven tests: spam, below the reject score\n"
    "score MH_TEST_SPAM 10.0\n"
)
SITE_CONFIG = Path("/etc/spamassassin")


class SpamAssassinMilter:
    def __init__(self, *, reject: int = 5, site_rules: str = "") -> None:
        self.reject = reject
        self.site_rules = site_rules
        self.spamd_port = free_port()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="mailhaven-spamassassin-"))
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def spec(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def start(self) -> SpamAssassinMilter:
        out = open(self.dir / "out.txt", "wb")  # noqa: SIM115 - closed in stop()
        self._out = out
        extra: list[str] = []
        if self.site_rules:  # Debian's site config (plugin loads, local.cf) plus ours
            site = self.dir / "site"
            shutil.copytree(SITE_CONFIG, site)
            (site / "zz_mailhaven_test.cf").write_text(self.site_rules)
            os.chmod(self.dir, 0o755)  # spamd reads its config as `nobody`
            extra.append(f"--siteconfigpath={site}")
        try:
            spamd = subprocess.Popen(
                [str(SPAMD), "-L", f"--listen=127.0.0.1:{self.spamd_port}", "-u", "nobody",
                 "--nouser-config", "--max-children=2", f"--pidfile={self.dir / 'spamd.pid'}",
                 *extra],
                stdout=out, stderr=subprocess.STDOUT,
            )
            self.procs.append(spamd)
            _wait(self.spamd_port, spamd, "spamd")
            milter = subprocess.Popen(
                [str(MILTER), "-p", f"inet:{self.port}@127.0.0.1", "-r", str(self.reject),
                 "--", "-d", "127.0.0.1", "-p", str(self.spamd_port)],
                stdout=out, stderr=subprocess.STDOUT,
            )
            self.procs.append(milter)
            _wait(self.port, milter, "spamass-milter")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        self.procs.clear()
        if hasattr(self, "_out"):
            self._out.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SpamAssassinMilter:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
