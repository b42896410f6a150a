"""A private Dovecot on loopback as a mail store: LMTP (with Sieve), the quota plugin, doveadm.

`DovecotStore(keep=tmp_path, ...)` writes its own `dovecot.conf` and runs the real Dovecot
(`dovecot -c CONF`, Debian's dovecot-lmtpd + dovecot-sieve) with everything of its own under one
directory: base_dir (sockets, master.pid), state_dir, the log, the Maildirs and Sieve scripts.

- LMTP on `127.0.0.1:<lmtp_port>` (a free port) and on the unix socket `lmtp_socket`;
- the users are `users` (a passwd-file userdb; LMTP does not log in, so no passwords; anyone
  else gets 550 5.1.1 at RCPT), each with a Maildir at `<mail>/<domain>/<user>/` (mailhaven's layout),
  owned by `nobody` (Dovecot refuses to act as root);
- the `quota` plugin in Maildir++ mode (`quota = maildir`) with `quota_rule` when given, and
  Pigeonhole Sieve for LMTP: `sieve_scripts = {"alice": "require ...;"}` makes alice's active
  script; vacation and redirect replies are submitted to `submission_host` (a loopback sink the
  test runs);
- `doveadm(...)` runs doveadm against this instance (e.g. `quota get -u alice`).

`stop()` sends SIGTERM to the master PID (from its pid file), waits for it to be gone and
SIGKILLs that PID only if it outlives the wait. Every wait is bounded.

Why not the test's tmp_path: Dovecot's mail processes run as `nobody` and must reach the
Maildirs; pytest's base temp is root's 0700. The instance lives in a fresh
`/tmp/mailhaven-dovecot-*` (0755); the caller's `keep` directory gets a copy of the log at stop.

SECURITY: test code only. Binds 127.0.0.1 only; needs root (as Dovecot does to start); never
touches the system instance (/etc/dovecot).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from tests.support.server import free_port, port_accepts

DOVECOT = Path("/usr/sbin/dovecot")
DOVEADM = Path("/usr/bin/doveadm")
SIEVE_PLUGIN = Path("/usr/lib/dovecot/modules/lib90_sieve_plugin.so")
LMTP_BINARY = Path("/usr/lib/dovecot/lmtp")
MAIL_USER = "nobody"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
POLL = 0.05

CONF = """\
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
instance_name = mailhaven-test-{port}
protocols = lmtp
ssl = no
listen = 127.0.0.1
auth_username_format = %Ln
first_valid_uid = {uid}
last_valid_uid = {uid}
mail_location = {mail_location}
passdb {{
  driver = static
  args = nopassword=y
}}
userdb {{
  driver = passwd-file
  args = {base}/users
}}
mail_plugins = quota
protocol lmtp {{
  mail_plugins = $mail_plugins sieve
  postmaster_address = postmaster@{hostname}
}}
lmtp_rcpt_check_quota = yes
quota_full_tempfail = yes
hostname = {hostname}
service lmtp {{
  unix_listener {base}/lmtp.sock {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
}}
service auth {{
  unix_listener auth-userdb {{
    mode = 0666
  }}
}}
plugin {{
  quota = maildir:User quota
{quota_rule}  sieve = file:{base}/sieve/%n;active={base}/sieve/%n.sieve
  sieve_vacation_send_from_recipient = yes
}}
submission_host = {submission_host}
"""


def skip_reason() -> str | None:
    if not (DOVECOT.exists() and DOVEADM.exists() and LMTP_BINARY.exists()):
        return "dovecot-lmtpd is not installed"
    if not SIEVE_PLUGIN.exists():
        return "dovecot-sieve is not installed"
    if os.geteuid() != 0:
        return "a private Dovecot needs root"
    return None


class DovecotStore:
    def __init__(
        self,
        keep: Path,
        *,
        quota_rule: str = "",
        sieve_scripts: Mapping[str, str] | None = None,
        submission_host: str = "127.0.0.1:9",
        mail_location: str | None = None,
        hostname: str = "store.example",
        users: tuple[str, ...] = ("alice", "bob", "carol"),
    ) -> None:
        self.keep = keep
        self.dir = Path(tempfile.mkdtemp(prefix="mailhaven-dovecot-"))
        os.chmod(self.dir, 0o755)
        self.mail = self.dir / "mail"
        self.domain = hostname
        self.lmtp_port = free_port()
        self.lmtp_socket = self.dir / "lmtp.sock"
        self.log_path = self.dir / "dovecot.log"
        self.conf = self.dir / "dovecot.conf"
        nobody = pwd.getpwnam(MAIL_USER)
        self.uid, self.gid = nobody.pw_uid, nobody.pw_gid
        for sub in ("run", "state", "sieve", "mail"):
            (self.dir / sub).mkdir()
        os.chown(self.mail, self.uid, self.gid)
        for user, script in (sieve_scripts or {}).items():
            path = self.dir / "sieve" / f"{user}.sieve"
            path.write_text(script)
        for path in (self.dir / "sieve", *(self.dir / "sieve").iterdir()):
            os.chown(path, self.uid, self.gid)
        (self.dir / "users").write_text("".join(
            f"{u}::{self.uid}:{self.gid}::{self.maildir(u)}::\n" for u in users
        ))
        rule = f"  quota_rule = *:storage={quota_rule}\n" if quota_rule else ""
        self.conf.write_text(CONF.format(
            base=self.dir, port=self.lmtp_port, uid=self.uid, gid=self.gid,
            mail_location=mail_location or "maildir:~", quota_rule=rule, submission_host=submission_host,
            hostname=hostname,
        ))
        self.pid: int | None = None

    def maildir(self, user: str) -> Path:
        """mailhaven's layout, `<mail>/<domain>/<user>/` (the user's home, Dovecot's `~`)."""
        return self.mail / self.domain / user

    def start(self) -> DovecotStore:
        # the daemon inherits stdout/stderr: pipes would never see EOF
        done = subprocess.run([str(DOVECOT), "-c", str(self.conf)], timeout=START_TIMEOUT,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"dovecot -c {self.conf} exited {done.returncode}: {self.log()}")
        deadline = time.monotonic() + START_TIMEOUT
        pidfile = self.dir / "run" / "master.pid"
        while time.monotonic() < deadline:
            if self.pid is None and pidfile.exists():
                with contextlib.suppress(ValueError, IndexError, OSError):
                    self.pid = int(pidfile.read_text().split()[0])  # known early: stoppable
            if self.pid is not None and port_accepts("127.0.0.1", self.lmtp_port) and \
                    self.lmtp_socket.exists():
                return self
            time.sleep(POLL)
        log = self.log()
        self.stop()  # never leave a half-started master behind
        raise RuntimeError(f"dovecot did not start within {START_TIMEOUT}s: {log}")

    def stop(self) -> None:
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(POLL)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # the next start must not find a stale socket from this one
        with contextlib.suppress(FileNotFoundError):
            self.lmtp_socket.unlink()

    def close(self) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            shutil.copy(self.log_path, self.keep / "dovecot.log")
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def doveadm(self, *args: str) -> str:
        done = subprocess.run(
            [str(DOVEADM), "-c", str(self.conf), *args],
            capture_output=True, text=True, timeout=30, check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"doveadm {' '.join(args)}: {done.stderr}")
        return done.stdout

    def quota(self, user: str) -> tuple[int, int]:
        """(bytes, messages) as Dovecot's quota plugin counts them (`doveadm quota get`)."""
        values: dict[str, int] = {}
        for line in self.doveadm("-f", "tab", "quota", "get", "-u", user).splitlines()[1:]:
            fields = line.split("\t")
            values[fields[1]] = int(fields[2])
        return values["STORAGE"] * 1024, values["MESSAGE"]

    def give_to_mail_user(self, path: Path) -> None:
        """chown -R to Dovecot's mail user (what `mail_user` will do for mailhaven's files)."""
        for root, dirs, files in os.walk(path):
            os.chown(root, self.uid, self.gid)
            for name in dirs + files:
                os.chown(os.path.join(root, name), self.uid, self.gid)

    def __enter__(self) -> DovecotStore:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie child of ours counts as gone
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    return True


@contextlib.contextmanager
def dovecot_store(keep: Path, **kwargs: Any) -> Iterator[DovecotStore]:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    store = DovecotStore(keep, **kwargs)
    try:
        store.start()
        yield store
    finally:
        store.close()
