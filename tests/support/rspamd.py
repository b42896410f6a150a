"""A private rspamd on loopback in milter mode, for end-to-end tests and the benchmark.

`RspamdInstance().start()` writes its own LOCAL_CONFDIR (over Debian's /etc/rspamd defaults)
in a fresh `/tmp/mailhaven-rspamd-*` directory and runs `rspamd -f` with its database, run and
log directories there:
- one `rspamd_proxy` worker with `milter = yes` and `self_scan = yes` on 127.0.0.1:<free port>
  (no separate normal worker, no controller, no fuzzy storage);
- no redis (Bayes, greylisting, rate limits, reputation are off or unconfigured), no network:
  DNS goes to `nameserver` (a `tests.support.dns_server` on loopback: every name NXDOMAIN) and
  the modules that exist only to ask the Internet (RBL, SURBL, SPF, DKIM, DMARC, ASN, fuzzy,
  phishing feeds, ...) are disabled;
- `milter_headers` adds rspamd's usual headers to every message (local clients included).

GTUBE is rspamd's built-in test pattern (action reject: `554 5.7.1 Gtube pattern`). A message
whose Subject contains `SPAM_MARK` scores 10 (the `MH_TEST_SPAM` rule): between the "add header"
(6) and "reject" (15) thresholds set here, so rspamd accepts it and adds `X-Spam: Yes`.

rspamd takes ~20-30 s to start (it compiles its regular expressions and the public suffix
list): use one instance per test module. `stop()` sends SIGTERM to the PID it started, waits,
and SIGKILLs that PID only if it outlives the wait.

SECURITY: test code only; binds 127.0.0.1; runs its workers as `_rspamd` (rspamd refuses root).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from tests.fakes import free_port

RSPAMD = Path("/usr/bin/rspamd")
USER = "_rspamd"
START_TIMEOUT = 120.0
STOP_TIMEOUT = 20.0
#: a Subject containing this scores 10: rspamd's "add header" action, not "reject"
SPAM_MARK = "mailhaven-test-spam-marker"
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
#: modules that only ask the network (or redis); off so a scan never waits for them
OFF = ["rbl", "surbl", "url_redirector", "fuzzy_check", "asn", "spf", "dkim", "dmarc", "arc", "emails", "phishing", "greylist", "ratelimit", "replies", "neural", "history_redis", "dcc", "mx_check", "dkim_signing", "elastic", "clickhouse", "metadata_exporter", "reputation", "url_reputation", "hfilter", "external_services"]


def skip_reason() -> str | None:
    if not RSPAMD.exists():
        return "rspamd is not installed (run scripts/install-test-deps as root)"
    if os.geteuid() != 0:
        return "a private rspamd here starts as root and drops to _rspamd"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return "the _rspamd user is missing"
    return None


class RspamdInstance:
    def __init__(self, nameserver: tuple[str, int], workers: int = 1) -> None:
        self.nameserver = nameserver
        self.workers = workers
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="mailhaven-rspamd-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def spec(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.dir / "log" / "rspamd.log"

    def _write_config(self) -> None:
        d = self.dir
        for sub in ("local.d", "override.d", "db", "run", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        host, port = self.nameserver
        (d / "local.d" / "worker-proxy.inc").write_text(
            f'bind_socket = "127.0.0.1:{self.port}";\nmilter = yes;\nself_scan = yes;\n'
            f"count = {self.workers};\ntimeout = 30s;\n"
            'upstream "local" { default = yes; self_scan = yes; }\n'
        )
        for worker, port_ in (("normal", free_port()), ("controller", free_port())):
            (d / "override.d" / f"worker-{worker}.inc").write_text(
                f'bind_socket = "127.0.0.1:{port_}";\ncount = 0;\n'
            )
        (d / "override.d" / "worker-fuzzy.inc").write_text("count = -1;\n")
        (d / "local.d" / "options.inc").write_text(
            f'dns {{ nameserver = ["{host}:{port}"]; timeout = 0.5s; retransmits = 1; }}\n'
            "disable_hyperscan = true;\n"
        )
        (d / "local.d" / "actions.conf").write_text(
            "reject = 15;\nadd_header = 6;\nrewrite_subject = null;\ngreylist = null;\n"
        )
        (d / "local.d" / "regexp.conf").write_text(
            f'MH_TEST_SPAM {{ re = "Subject=/{SPAM_MARK}/iH"; score = 10.0; '
            'description = "mailhaven tests: scored as spam, below reject"; }\n'
        )
        (d / "local.d" / "milter_headers.conf").write_text(
            'use = ["x-spamd-result", "x-rspamd-queue-id", "x-spam-status", '
            '"authentication-results"];\nskip_local = false;\nskip_authenticated = false;\n'
        )
        for module in OFF:
            (d / "override.d" / f"{module}.conf").write_text("enabled = false;\n")
        user = pwd.getpwnam(USER)
        for path in (d, *d.rglob("*")):
            os.chown(path, user.pw_uid, user.pw_gid)

    def start(self) -> RspamdInstance:
        self._write_config()
        d = self.dir
        out = open(d / "stdout.txt", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                str(RSPAMD), "-f", "-c", "/etc/rspamd/rspamd.conf",
                "--var", f"LOCAL_CONFDIR={d}", "--var", f"DBDIR={d / 'db'}",
                "--var", f"RUNDIR={d / 'run'}", "--var", f"LOGDIR={d / 'log'}",
                "-u", USER, "-g", USER,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        self._out = out
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rspamd exited: {(d / 'stdout.txt').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("rspamd did not start listening in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        if self.proc is not None:
            self._out.close()
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RspamdInstance:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@contextlib.contextmanager
def milter_for_tests() -> Iterator[RspamdInstance]:
    """A private rspamd in milter mode whose DNS is a loopback server that knows nothing (no
    lookup leaves the machine); the test is skipped, saying why, where rspamd cannot run."""
    import pytest
    from tests.support.dns_server import DNSServer

    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with DNSServer({}) as dns, RspamdInstance(dns.address) as instance:
        yield instance
