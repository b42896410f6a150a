"""A private Postfix instance on loopback, for interoperability tests.

`PostfixInstance(...)` generates its own `main.cf` and `master.cf` and runs the real Postfix
daemon (`postfix -c DIR start`) with everything of its own under one directory: config,
queue_directory, data_directory, the Maildirs it delivers to and its maillog (postlogd). It:

- listens only on `127.0.0.1:<port>` (a free port; `inet_interfaces = 127.0.0.1`, ipv4 only);
  master.cf has no port-25 `smtp inet` service at all;
- delivers mail for `domain` (virtual(8)) to a Maildir per user under `mail/`, so a test reads
  the delivered files (`messages()`, `wait_for_messages()`); other users of `domain` are
  rejected at RCPT with 550 5.1.1 (virtual_mailbox_maps lists the known ones);
- relays everything else from 127.0.0.0/8 to `relayhost` (e.g. `[127.0.0.1]:2525`, a mailhaven)
  with DNS off (`smtp_dns_support_level = disabled`), so nothing leaves loopback;
- offers STARTTLS when given a certificate (`tls_cert`/`tls_key`, e.g. from trustme), and uses
  opportunistic STARTTLS towards `relayhost` (`settings` overrides any main.cf parameter,
  `services` adds master.cf lines);
- runs no daemon chrooted, with short retry times.

`stop()` runs `postfix -c DIR stop`, then waits for the master PID (from its pid file) to be
gone, and SIGKILLs that PID only if it outlives the wait. Every wait is bounded.

Why the directory is not the test's tmp_path: Postfix's daemons drop privileges (mail_owner
`postfix`; virtual(8) delivers as `nobody`), and virtual(8) opens its Maildirs by absolute
path, which fails under pytest's base temp (mode 0700, owned by root). So the instance lives in
a fresh `/tmp/mailhaven-postfix-*` (mode 0755); the caller's `keep` directory (the test's
tmp_path) gets a symlink to it while it runs and a copy of the maillog when it stops, and the
instance directory is removed after stop.

`skip_reason()` says why Postfix cannot run here (not installed, not root), or None;
`postfix_instance(...)` is a context manager that calls `pytest.skip` with that reason.

SECURITY: test code only. Binds 127.0.0.1 only; relays only for 127.0.0.0/8. Needs root (as
Postfix itself does to start); it never touches the system instance (/etc/postfix).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pty
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from tests.fakes import free_port
from tests.support.logwatch import LogWatch

POSTFIX = Path("/usr/sbin/postfix")
POSTCONF = Path("/usr/sbin/postconf")
MASTER = Path("/usr/lib/postfix/sbin/master")
#: virtual(8) delivers as this user (virtual_minimum_uid is 100; root is never allowed).
MAILBOX_USER = "nobody"
POLL = 0.05
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
COMMAND_TIMEOUT = 30.0

#: master.cf: the services a relay + virtual-delivery instance needs, none chrooted. Columns:
#: service type private unpriv chroot wakeup maxproc command (master(5)).
MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
tlsmgr unix - - n 1000? 1 tlsmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
local unix - n n - - local
virtual unix - n n - - virtual
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""


class PostfixError(RuntimeError):
    pass


def skip_reason() -> str | None:
    """Why a private Postfix cannot run on this machine, or None when it can."""
    for path in (POSTFIX, POSTCONF, MASTER):
        if not path.exists():
            return (
                f"Postfix is not installed ({path} missing; run scripts/install-test-deps as root)"
            )
    if os.geteuid() != 0:
        return "Postfix needs root to start its master(8) daemon (tests run as a normal user)"
    try:
        pwd.getpwnam("postfix")
        pwd.getpwnam(MAILBOX_USER)
        grp.getgrnam("postdrop")
    except KeyError as exc:
        return f"Postfix's users/groups are missing: {exc}"
    return None




class PostfixInstance(LogWatch):
    """One private Postfix (see the module docstring)."""

    log_name = "Postfix log"

    def __init__(
        self,
        *,
        keep: Path | None = None,
        domain: str = "pf.test",
        users: Sequence[str] = ("bob",),
        relayhost: str = "",
        port: int | None = None,
        hostname: str | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        settings: Mapping[str, str] | None = None,
        services: str = "",
    ) -> None:
        self.keep = keep
        self.domain = domain
        self.users = tuple(users)
        self.relayhost = relayhost
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self.hostname = hostname or f"mx.{domain}"
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.settings = dict(settings or {})
        #: extra master.cf lines, e.g. an smtp(8) transport with its own `-o` options
        self.services = services
        self.dir: Path | None = None
        self.master_pid: int | None = None

    # ------------------------------------------------------------------ paths

    def _path(self, *parts: str) -> Path:
        if self.dir is None:
            raise PostfixError("instance not created (start() first)")
        return self.dir.joinpath(*parts)

    @property
    def config_dir(self) -> Path:
        return self._path("etc")

    @property
    def queue_dir(self) -> Path:
        return self._path("spool")

    @property
    def mail_dir(self) -> Path:
        return self._path("mail")

    @property
    def log_path(self) -> Path:
        return self._path("log", "maillog")

    def maildir(self, user: str) -> Path:
        return self.mail_dir / user

    # ------------------------------------------------------------------ configuration

    def main_cf(self) -> dict[str, str]:
        assert self.dir is not None
        d = self.dir
        mailboxes = ", ".join(f"{u}@{self.domain}={u}/" for u in self.users)  # "/": Maildir
        nobody = pwd.getpwnam(MAILBOX_USER)
        cf = {
            "compatibility_level": "3.6",
            "queue_directory": str(d / "spool"),
            "data_directory": str(d / "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": self.hostname,
            "mydomain": self.domain,
            "myorigin": self.domain,
            "mydestination": "",
            "inet_interfaces": self.host,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            # Mail from loopback is not "local" here: no header fix-ups, as a remote MX.
            "local_header_rewrite_clients": "",
            "virtual_mailbox_domains": self.domain,
            "virtual_mailbox_base": str(d / "mail"),
            "virtual_mailbox_maps": f"inline:{{ {mailboxes} }}",
            "virtual_uid_maps": f"static:{nobody.pw_uid}",
            "virtual_gid_maps": f"static:{nobody.pw_gid}",
            "relayhost": self.relayhost,
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            "maillog_file": str(d / "log" / "maillog"),
            "maillog_file_prefixes": str(d / "log"),
            "smtpd_banner": "$myhostname ESMTP Postfix",
            # Retry fast: a test waits seconds, not minutes.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "delay_warning_time": "0",
            "smtp_tls_security_level": "may",
            "smtp_tls_loglevel": "1",
            "smtpd_tls_loglevel": "1",
            "smtpd_tls_security_level": "none",
        }
        if self.tls_cert is not None and self.tls_key is not None:
            cf.update(
                smtpd_tls_security_level="may",
                smtpd_tls_cert_file=str(self.tls_cert),
                smtpd_tls_key_file=str(self.tls_key),
            )
        cf.update(self.settings)
        return cf

    def _write_config(self) -> None:
        lines = [f"{k} = {v}" for k, v in self.main_cf().items()]
        (self.config_dir / "main.cf").write_text("\n".join(lines) + "\n")
        listen = f"{self.host}:{self.port}"
        (self.config_dir / "master.cf").write_text(MASTER_CF.format(listen=listen) + self.services)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`postfix -c DIR args...`. Postfix writes its errors to stderr only when stderr is a
        terminal (else to the maillog, which may not exist yet), so stderr is a pty here."""
        controller, terminal = pty.openpty()
        try:
            proc = subprocess.run(
                [str(POSTFIX), "-c", str(self.config_dir), *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=terminal,
                text=True,
                timeout=COMMAND_TIMEOUT,
                check=False,
            )
            os.close(terminal)
            terminal = -1
            proc.stderr = _drain(controller)
        finally:
            if terminal >= 0:
                os.close(terminal)
            os.close(controller)
        if check and proc.returncode != 0:
            raise PostfixError(
                f"postfix {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}\n"
                f"{self.log_tail()}"
            )
        return proc

    def _create(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mailhaven-postfix-", dir="/tmp"))
        self.dir.chmod(0o755)
        for sub in ("etc", "spool", "log"):
            (self.dir / sub).mkdir()
        (self.dir / "data").mkdir(mode=0o700)
        postfix_user = pwd.getpwnam("postfix")
        os.chown(self.dir / "data", postfix_user.pw_uid, postfix_user.pw_gid)
        nobody = pwd.getpwnam(MAILBOX_USER)
        (self.dir / "mail").mkdir(mode=0o700)
        os.chown(self.dir / "mail", nobody.pw_uid, nobody.pw_gid)
        if self.keep is not None:
            self.keep.mkdir(parents=True, exist_ok=True)
            link = self.keep / "postfix-instance"
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to(self.dir)
        self._write_config()

    # ------------------------------------------------------------------ life cycle

    def start(self, timeout: float = START_TIMEOUT) -> PostfixInstance:
        """Create the instance, `postfix check` (makes the queue directories with the right
        owners), `postfix start`, then wait until the listener accepts a connection."""
        if self.master_pid is not None:
            raise PostfixError("already started")
        reason = skip_reason()
        if reason is not None:
            raise PostfixError(reason)
        try:
            if self.dir is None:
                self._create()
            self._run("check")
            self._run("start")
            self._wait_listening(timeout)
        except BaseException:
            self.stop()  # whatever did start, and the directory (the maillog is kept)
            raise
        return self

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            pid = self._read_pid()
            if pid is not None and _alive(pid):
                self.master_pid = pid
            if self.master_pid is not None and _accepts(self.host, self.port):
                return
            if time.monotonic() > deadline:
                raise PostfixError(
                    f"Postfix not listening on {self.port} after {timeout}s\n{self.log_tail()}"
                )
            time.sleep(POLL)

    def _read_pid(self) -> int | None:
        try:
            text = (self.queue_dir / "pid" / "master.pid").read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isdigit() else None

    def reload(self) -> None:
        """Rewrite main.cf/master.cf from the attributes and `postfix reload`."""
        self._write_config()
        self._run("reload")

    def flush(self) -> None:
        """`postfix flush`: attempt deferred mail now."""
        self._run("flush")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """`postfix stop`, wait for the master PID to exit; SIGKILL it (by PID) if it lingers.
        Then keep a copy of the maillog in `keep` and remove the instance directory."""
        if self.dir is None:
            return
        pid = self.master_pid or self._read_pid()
        if pid is not None and _alive(pid):
            self._run("stop", check=False)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(POLL)
            if _alive(pid) and _is_master(pid):
                os.kill(pid, signal.SIGKILL)
        self.master_pid = None
        if self.keep is not None:
            with contextlib.suppress(FileNotFoundError):
                shutil.copyfile(self.log_path, self.keep / "postfix-maillog")
            with contextlib.suppress(FileNotFoundError):
                (self.keep / "postfix-instance").unlink()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ observation

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, PostfixError):
            return ""


    def messages(self, user: str) -> list[Path]:
        """Delivered files of `user` (Maildir new/ and cur/), oldest first."""
        found: list[Path] = []
        for sub in ("new", "cur"):
            with contextlib.suppress(FileNotFoundError):
                found.extend(p for p in (self.maildir(user) / sub).iterdir() if p.is_file())
        return sorted(found, key=lambda p: p.name)

    def wait_for_messages(self, user: str, count: int, *, timeout: float = 10.0) -> list[Path]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages(user)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"Postfix {user}@{self.domain}: {len(found)} message(s), wanted {count}\n"
                    f"{self.log_tail()}"
                )
            time.sleep(POLL)


def _drain(fd: int, limit: int = 1 << 20) -> str:
    """What is buffered on a pty's controller side, without blocking (a daemon that kept the
    terminal open must not hang us)."""
    os.set_blocking(fd, False)
    out = b""
    while len(out) < limit:
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, OSError):  # EAGAIN: nothing more now; EIO: no writer left
            break
        if not chunk:
            break
        out += chunk
    return out.decode("utf-8", "replace").replace("\r\n", "\n")


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (master is not our child: init reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _is_master(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/exe") == str(MASTER)
    except OSError:
        return False


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def postfix_instance(**kwargs: Any) -> Iterator[PostfixInstance]:
    """`with postfix_instance(keep=tmp_path, ...) as pf:` start, yield, always stop; skips the
    test (pytest.skip with the reason) where Postfix cannot run."""
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    instance = PostfixInstance(**kwargs)
    try:
        yield instance.start()
    finally:
        instance.stop()
