"""A private ClamAV (clamd + clamav-milter, Debian's) on loopback, for end-to-end tests.

ClamAV's real signature databases come only from the network (freshclam), which tests never
reach. clamd loads any database file it finds in its DatabaseDirectory, though, so the test
writes its own: `mailhaven-test.hdb`, one MD5 hash signature for the EICAR test file (the line
`sigtool --md5 eicar.com` prints, under our own name). clamd reports it as
`Mailhaven.Test.EICAR.UNOFFICIAL` (the suffix marks signatures that are not ClamAV's own).
No freshclam runs; nothing is downloaded.

`ClamAV().start()` writes, in a fresh `/tmp/mailhaven-clamav-*` directory:
- `clamd.conf`: a unix socket there, DatabaseDirectory `db/`, Foreground, its own log;
- `clamav-milter.conf`: MilterSocket on 127.0.0.1:<free port>, ClamdSocket that unix socket,
  `OnInfected Reject` with `RejectMsg` (so the client reads `550 5.7.1 Virus found: <name>`),
  `OnFail Defer`, `AddHeader Replace` (`X-Virus-Scanned`, `X-Virus-Status` on every message
  scanned), `ReportHostname` fixed so headers do not leak this machine's name;
and runs both in the foreground. clamd with one signature is ready in well under a second;
readiness is clamd answering `PING` and the milter accepting a TCP connection. `stop_milter()`,
`stop_clamd()` and `stop()` SIGTERM the PIDs this object started (SIGKILL only if one outlives
the wait; clamav-milter's accept loop is woken by a connection so it exits at once, not after
libmilter's 5 s poll); `stop()` also removes the directory.

The EICAR string is assembled at run time from two halves, so no file of this repository is
itself an EICAR file a scanner on a developer's machine would flag.

Both run as the user running the tests (no `User` option: no root needed, nothing to chown).

SECURITY: test code only; clamd listens on a unix socket in a 0700 directory, the milter on
127.0.0.1.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from tests.fakes import free_port

CLAMD = Path("/usr/sbin/clamd")
MILTER = Path("/usr/sbin/clamav-milter")
SIGTOOL = Path("/usr/bin/sigtool")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
#: the EICAR anti-virus test file (68 bytes, eicar.org), in two halves: see the module docstring
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
SIGNATURE_NAME = "Mailhaven.Test.EICAR"
#: what clamd reports for it: `.UNOFFICIAL` is appended to signatures not signed by ClamAV
VIRUS_NAME = SIGNATURE_NAME + ".UNOFFICIAL"
REPORT_HOSTNAME = "scanner.test.invalid"
#: clamav-milter's text for OnInfected Reject (`%v`: the virus name); the code is its 550 5.7.1
REJECT_MSG = "Virus found: %v"


def skip_reason() -> str | None:
    for path in (CLAMD, MILTER):
        if not path.exists():
            return f"{path} is missing (clamav-daemon, clamav-milter: scripts/install-test-deps)"
    return None


def hdb_line(data: bytes, name: str) -> str:
    """An MD5 hash signature (`.hdb`): what `sigtool --md5 FILE` prints, with `name` for FILE."""
    return f"{hashlib.md5(data).hexdigest()}:{len(data)}:{name}"


def _clamd_pong(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2.0)
            s.connect(str(path))
            s.sendall(b"zPING\0")
            return s.recv(16) == b"PONG\0"
    except OSError:
        return False


def _milter_listens(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _terminate(proc: subprocess.Popen[bytes], wake_port: int | None = None) -> None:
    """SIGTERM, wait (bounded), SIGKILL. `wake_port`: libmilter notices SIGTERM only when its
    accept loop wakes (every 5 s); a connection to its port wakes it at once."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        try:
            proc.wait(0.1)
            return
        except subprocess.TimeoutExpired:
            if wake_port is not None:
                _milter_listens(wake_port)
    proc.kill()
    proc.wait(STOP_TIMEOUT)


class ClamAV:
    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="mailhaven-clamav-"))
        self.clamd_socket = self.dir / "clamd.sock"
        self.clamd: subprocess.Popen[bytes] | None = None
        self.milter: subprocess.Popen[bytes] | None = None
        self._out = open(self.dir / "out.txt", "wb")  # noqa: SIM115 - closed in stop()

    @property
    def spec(self) -> str:
        """The address for mailhaven's `milters` list."""
        return f"inet:127.0.0.1:{self.port}"

    @property
    def clamd_log(self) -> Path:
        return self.dir / "clamd.log"

    @property
    def milter_log(self) -> Path:
        return self.dir / "clamav-milter.log"

    def _write_config(self) -> None:
        d = self.dir
        (d / "db").mkdir()
        (d / "db" / "mailhaven-test.hdb").write_text(hdb_line(EICAR, SIGNATURE_NAME) + "\n")
        (d / "clamd.conf").write_text(
            f"LocalSocket {self.clamd_socket}\n"
            f"DatabaseDirectory {d / 'db'}\n"
            f"TemporaryDirectory {d}\n"
            f"LogFile {self.clamd_log}\n"
            "LogTime yes\n"
            "Foreground yes\n"
            "MaxThreads 4\n"
        )
        (d / "clamav-milter.conf").write_text(
            f"MilterSocket inet:{self.port}@127.0.0.1\n"
            f"ClamdSocket unix:{self.clamd_socket}\n"
            f"TemporaryDirectory {d}\n"
            f"LogFile {self.milter_log}\n"
            "LogTime yes\n"
            "LogInfected Basic\n"
            "Foreground yes\n"
            "OnClean Accept\n"
            "OnInfected Reject\n"
            f"RejectMsg {REJECT_MSG}\n"
            "OnFail Defer\n"
            "AddHeader Replace\n"
            f"ReportHostname {REPORT_HOSTNAME}\n"
            "ReadTimeout 30\n"
        )

    def _spawn(self, binary: Path, conf: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [str(binary), "-c", str(self.dir / conf)],
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT,
        )

    def start(self) -> ClamAV:
        try:
            self._write_config()
            self.clamd = self._spawn(CLAMD, "clamd.conf")
            self._until(self.clamd, lambda: _clamd_pong(self.clamd_socket), "clamd")
            self.milter = self._spawn(MILTER, "clamav-milter.conf")
            self._until(self.milter, lambda: _milter_listens(self.port), "clamav-milter")
        except BaseException:
            self.stop()
            raise
        return self

    def _until(self, proc: subprocess.Popen[bytes], ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}\n{self.output()}")
            if ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{what} did not get ready in {START_TIMEOUT}s\n{self.output()}")

    def output(self) -> str:
        """What both wrote to stdout/stderr and their logs (for failure messages)."""
        parts = []
        for path in (self.dir / "out.txt", self.clamd_log, self.milter_log):
            with contextlib.suppress(OSError):
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    def stop_milter(self) -> None:
        if self.milter is not None:
            _terminate(self.milter, wake_port=self.port)

    def stop_clamd(self) -> None:
        if self.clamd is not None:
            _terminate(self.clamd)

    def stop(self) -> None:
        self.stop_milter()
        self.stop_clamd()
        self._out.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> ClamAV:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
