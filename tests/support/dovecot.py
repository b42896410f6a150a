"""A private Dovecot (IMAP, POP3) on loopback, configured from contrib/dovecot/dovecot.conf.

    with Dovecot(workdir, users_file=..., mail_dir=..., mail_user="nobody",
                 mail_group="nogroup") as dovecot:
        imaplib.IMAP4("127.0.0.1", dovecot.imap_port)

The contrib file is the configuration a sysadmin installs; this runs that file with only its
deployment specifics replaced (paths, the vmail account, ports, TLS off or on the given files,
logging to a file, its own base_dir/state_dir), so the test proves the shipped config works. The process
runs in the foreground (`dovecot -F`) and is stopped by its PID (SIGTERM, then SIGKILL).

SECURITY: test code only; listens on 127.0.0.1. Run as root (Dovecot's master needs it to
switch to the mail user), which the tests are.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from tests.support.server import free_port

CONTRIB = Path(__file__).parents[2] / "contrib" / "dovecot" / "dovecot.conf"
START_TIMEOUT = 20.0


def available() -> bool:
    return shutil.which("dovecot") is not None and Path("/usr/lib/dovecot/imap").exists()


class Dovecot:
    def __init__(self, workdir: Path, *, users_file: Path, mail_dir: Path, mail_user: str,
                 mail_group: str, pop3: bool = True,
                 tls: tuple[Path, Path] | None = None) -> None:
        """`tls`: (certificate, key) files for the contrib file's ssl_cert and ssl_key, with
        `ssl = required` kept; None: TLS off."""
        self.tls = tls
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.imap_port = free_port()
        self.pop3_port = free_port() if pop3 else 0
        self.log_path = self.dir / "dovecot.log"
        self.config_path = self.dir / "dovecot.conf"
        self.config_path.write_text(self._config(users_file, mail_dir, mail_user, mail_group))
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr: BinaryIO | None = None

    def _config(self, users: Path, mail: Path, user: str, group: str) -> str:
        text = CONTRIB.read_text()
        for old, new in [
            ("/var/lib/mailhaven/users.passwd", str(users)),
            ("/var/vmail", str(mail)),
            ("uid=vmail", f"uid={user}"),
            ("gid=vmail", f"gid={group}"),
            ("mail_privileged_group = vmail", f"mail_privileged_group = {group}"),
            ("listen = *, ::", "listen = 127.0.0.1"),
            ("port = 143", f"port = {self.imap_port}"),
            ("port = 993", "port = 0"),
            *self._tls_lines(),
            ("log_path = syslog", f"log_path = {self.log_path}"),
        ]:
            assert old in text, f"contrib/dovecot/dovecot.conf no longer has {old!r}"
            text = text.replace(old, new)
        text += (
            f"\nbase_dir = {self.dir / 'run'}\nstate_dir = {self.dir / 'state'}\n"
            f"instance_name = mailhaven-test-{self.imap_port}\n"
            "auth_verbose = yes\n"
        )
        if self.pop3_port:
            text = text.replace("protocols = imap", "protocols = imap pop3")
            text += f"service pop3-login {{\n  inet_listener pop3 {{\n    port = {self.pop3_port}\n"
            text += "  }\n  inet_listener pop3s {\n    port = 0\n  }\n}\n"
        return text

    def _tls_lines(self) -> list[tuple[str, str]]:
        cert, key = "ssl_cert = </var/lib/mailhaven/acme/cert.pem\n", \
            "ssl_key = </var/lib/mailhaven/acme/key.pem\n"
        if self.tls is None:
            return [("ssl = required", "ssl = no"), (cert, ""), (key, "")]
        return [(cert, f"ssl_cert = <{self.tls[0]}\n"), (key, f"ssl_key = <{self.tls[1]}\n")]

    def reload(self, timeout: float = 15.0) -> None:
        """`doveadm reload`: SIGHUP to the master, which re-reads the config and TLS files.

        Returns once the master has logged the reload and rewritten `run/config`, plus a short
        settle: a login process started inside that window finds no config and dies (Dovecot
        logs it as an Error), which is Dovecot's reload, not what a test is looking for."""
        assert self.proc is not None
        marker = "reloading configuration"
        before = self._whole_log().count(marker)
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self._whole_log().count(marker) <= before or not (self.dir / "run" / "config").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"dovecot did not reload: {self.logs()}")
            time.sleep(0.05)
        time.sleep(0.5)

    def start(self) -> Dovecot:
        (self.dir / "state").mkdir(exist_ok=True)
        self._stderr = open(self.dir / "stderr.log", "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            ["dovecot", "-F", "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL, stderr=self._stderr,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dovecot exited: {self.logs()}")
            try:
                with socket.create_connection(("127.0.0.1", self.imap_port), timeout=0.5):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"dovecot did not listen: {self.logs()}") from None
                time.sleep(0.05)

    def _whole_log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def logs(self) -> str:
        parts = [p.read_text(errors="replace") for p in (self.dir / "stderr.log", self.log_path)
                 if p.exists()]
        return "\n".join(parts)[-4000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> Dovecot:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
