"""The systems under test, each on its own loopback ports: mailhaven, Postfix, aiosmtpd, smtp-sink.

- `Mailhaven`: `.venv/bin/mailhaven serve -c <generated TOML>` with a fresh state directory.
  mode "hold": accept-only (`[etrn] held_domains = ["bench.test"]`: durable, never delivered);
  mode "relay": everything goes to `relayhost = [127.0.0.1]:SINK` without TLS.
- `Postfix`: a separate instance of Debian's Postfix with its own config directory, queue
  directory and data directory under bench/tmp/postfix/ (`postfix -c DIR start`); the system's
  /etc/postfix and port 25 are never touched. Two smtpd listeners: RELAY (relays to the sink)
  and HOLD (`check_recipient_access static:HOLD`: durable enqueue, no delivery).
- `Aiosmtpd`: bench/aiosmtpd_peer.py (write + fsync + rename per message).
- `SmtpSink`: Postfix's smtp-sink, the C receiver that discards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import common
from common import HOST

MAILHAVEN = common.ROOT / ".venv" / "bin" / "mailhaven"


#: the local-delivery scenario's recipients: a mailbox of each system
LOCAL_RCPT = "postmaster@localhost"
POSTFIX_LOCAL_RCPT = "rcpt@vlocal.test"


class Mailhaven:
    #: Settings for every instance (run.py --set), applied last: e.g. to measure an engine
    #: option that is off by default. {"table": {"key": value}}; table "" is the top level.
    overrides: dict[str, dict[str, object]] = {}

    def __init__(self, name: str, mode: str, *, sink_port: int | None = None,
                 pop3_port: int | None = None, state: Path | None = None,
                 message_size: int = 200 * 2**20,
                 extra: dict[str, dict[str, object]] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        #: the server's environment (None: ours); bench/ab.py sets PYTHONPATH to another tree
        self.env = env
        self.mode = mode
        self.port = common.free_port()
        self.sink_port = sink_port
        self.pop3_port = pop3_port
        self.dir = common.TMP / name
        self.state = state or self.dir / "state"
        self.config = self.dir / "mailhaven.toml"
        self.log = self.dir / "mailhaven.log"
        self.message_size = message_size
        # more keys per TOML table, e.g. {"relay": {"transport": {...}}, "queue": {...}}
        self.extra = extra or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        top: dict[str, object] = {
            "hostname": "mh.bench.test",
            "state_dir": str(self.state),
            # mailhaven's default: every message logged, as the Postfix peer does (to a file)
            "log_level": "info",
            "local_domains": ["localhost"],
            "local_users": ["postmaster"],
        }
        if self.mode == "relay":
            top["relayhost"] = f"[{HOST}]:{self.sink_port}"
        tables: dict[str, dict[str, object]] = {
            "listen": {
                "smtp": [f"{HOST}:{self.port}"], "submission": [], "submissions": [],
                "pop3": [f"{HOST}:{self.pop3_port}"] if self.pop3_port else [], "pop3s": [],
            },
            "limits": {"connections": 20000, "connections_per_ip": 20000,
                       "message_size": self.message_size},
        }
        if self.mode == "relay":
            tables["relay"] = {"tls": "none", "relayhost_tls": "none"}
        elif self.mode == "hold":
            tables["etrn"] = {"held_domains": ["bench.test"]}
        for source in (self.extra, self.overrides):
            for name, keys in source.items():
                (top if name == "" else tables.setdefault(name, {})).update(keys)
        lines = [f"{k} = {_toml(v)}" for k, v in top.items()]
        for name, keys in tables.items():
            lines.append(f"[{name}]")
            lines += [f"{k} = {_toml(v)}" for k, v in keys.items()]
        self.config.write_text("\n".join(lines) + "\n")

    def argv(self) -> list[str]:
        return [str(MAILHAVEN), "serve", "-c", str(self.config)]

    def start(self, timeout: float = 120.0) -> float:
        """Start and wait for the greeting; returns the seconds that took."""
        self.write_config()
        t0 = time.perf_counter()
        self.proc = common.spawn(self.argv(), log_to=self.log, cwd=self.dir, env=self.env)
        while True:  # fail fast, with the log's last line, if the server dies while starting
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-1:]
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) while "
                                   f"starting: {tail}; see {self.log}")
            try:
                common.wait_banner(self.port, 0.5)
                return time.perf_counter() - t0
            except RuntimeError:
                if time.perf_counter() - t0 > timeout:
                    raise

    def adopt(self, proc: subprocess.Popen[bytes]) -> None:
        """Use a process started otherwise (e.g. under a profiler)."""
        self.proc = proc

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        common.stop(self.proc, grace=30.0)
        self.proc = None

    def queue_count(self) -> int:
        """Messages in the spool, read-only (WAL readers never block the daemon)."""
        return self._count("SELECT count(*) FROM message")

    def recipient_count(self, status: str | None = None) -> int:
        """Recipient rows (of one status): an index scan, cheap even with 100k deferred rows,
        where count(*) over `message` reads every inline body."""
        if status is None:
            return self._count("SELECT count(*) FROM recipient")
        return self._count("SELECT count(*) FROM recipient WHERE status = ?", (status,))

    def _count(self, sql: str, args: tuple[object, ...] = ()) -> int:
        """Summed over every queue shard (`spool`, and `spool-<k>` with smtp_processes > 1)."""
        total = 0
        for shard in [self.state / "spool", *sorted(self.state.glob("spool-[1-9]*"))]:
            db = shard / "queue.db"
            if not db.exists():
                continue
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
            try:
                total += int(conn.execute(sql, args).fetchone()[0])
            finally:
                conn.close()
        return total


def _toml(value: object) -> str:
    """A TOML literal for the few value types our configs use."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml(str(k))} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


class Aiosmtpd:
    name = "aiosmtpd-fsync"

    def __init__(self, python: Path) -> None:
        self.python = python
        self.port = common.free_port()
        self.spool = common.TMP / "aiosmtpd" / "spool"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        common.fresh_dir(self.spool)
        self.proc = common.spawn(
            [str(self.python), str(common.BENCH / "aiosmtpd_peer.py"), "--port", str(self.port),
             "--spool", str(self.spool)], log_to=common.TMP / "aiosmtpd" / "aiosmtpd.log")
        common.wait_port(self.port, 30, self.proc)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stored(self) -> int:
        new = self.spool / "new"
        return len(os.listdir(new)) if new.is_dir() else 0

    def clear(self) -> None:
        for sub in ("new", "tmp"):
            common.fresh_dir(self.spool / sub)

    def stop(self) -> None:
        common.stop(self.proc)
        self.proc = None


class SmtpSink:
    """smtp-sink on a free port; `-c` prints a running count we do not need."""

    def __init__(self, name: str = "sink") -> None:
        self.port = common.free_port()
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = common.spawn(
            [*common.postfix_tool("smtp-sink"), "-u", "nobody", f"{HOST}:{self.port}", "1024"])
        common.wait_port(self.port, 10, self.proc)

    def stop(self) -> None:
        common.stop(self.proc)
        self.proc = None


# ------------------------------------------------------------------------------------ Postfix
def postfix_available() -> bool:
    return shutil.which("postfix") is not None and Path("/usr/lib/postfix/sbin/master").exists()


def install_postfix() -> None:
    """Debian's postfix package, preseeded "No configuration" (no primary instance is set up)."""
    if postfix_available():
        return
    if os.geteuid() != 0:
        raise SystemExit("Postfix is not installed and we are not root: apt-get install postfix")
    common.log("installing Debian's postfix package (No configuration) ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["debconf-set-selections"], input=(
        "postfix postfix/main_mailer_type select No configuration\n"
        "postfix postfix/mailname string bench.invalid\n"), text=True, check=True)
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=False,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postfix"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    if not postfix_available():
        raise SystemExit("postfix installation failed")


def postfix_version() -> str:
    out = subprocess.run(["postconf", "-d", "-h", "mail_version"], capture_output=True,
                         text=True, check=False)
    return out.stdout.strip() or "?"


# master.cf of the bench instance: two loopback smtpd listeners, the usual internal services,
# no chroot (Debian's chroot needs copied resolver files), nothing on port 25.
_MASTER_CF = """\
{host}:{relay} inet n - n - - smtpd
{host}:{hold} inet n - n - - smtpd
  -o smtpd_recipient_restrictions=check_recipient_access,static:HOLD,permit_mynetworks,reject
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
virtual   unix  -       n       n       -       -       virtual
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    """A separate Postfix instance under bench/tmp/postfix/{etc,spool,data}."""

    def __init__(self, sink_port: int) -> None:
        self.base = common.TMP / "postfix"
        self.etc = self.base / "etc"
        self.queue = self.base / "spool"
        self.data = self.base / "data"
        self.relay_port = common.free_port()
        self.hold_port = common.free_port()
        self.sink_port = sink_port
        # deferred.test goes to a port nobody listens on: its mail is deferred (queue scale)
        self.closed_port = common.free_port()
        #: virtual(8)'s Maildirs (the local-delivery scenario)
        self.vmail = self.base / "vmail"
        self.running = False

    def _pf(self, *args: str, timeout: float = 120.0, check: bool = True) -> str:
        return common.run(["postfix", "-c", str(self.etc), *args], timeout=timeout,
                          check=check).stdout

    def setup(self, extra: dict[str, str] | None = None) -> None:
        """A fresh instance; `extra`: more main.cf parameters (e.g. longer backoff)."""
        install_postfix()
        if self.queue.exists():  # a stale instance from an interrupted run
            self.kill_stale()
        shutil.rmtree(self.base, ignore_errors=True)
        for d in (self.etc, self.queue, self.data, self.vmail):
            d.mkdir(parents=True)
        os.chown(self.data, *_ids("postfix"))
        vuid, vgid = _ids("nobody")
        os.chown(self.vmail, vuid, vgid)
        main = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "inet_interfaces": HOST,
            "inet_protocols": "ipv4",
            "myhostname": "pf.bench.test",
            "mydomain": "bench.test",
            "myorigin": "bench.test",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "relay_domains": "bench.test, deferred.test",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "relayhost": f"[{HOST}]:{self.sink_port}",
            "default_transport": f"smtp:[{HOST}]:{self.sink_port}",
            "relay_transport": f"smtp:[{HOST}]:{self.sink_port}",
            "transport_maps": f"inline:{{deferred.test=smtp:[{HOST}]:{self.closed_port}}}",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "biff": "no",
            "notify_classes": "",
            "message_size_limit": str(200 * 2**20),
            "mailbox_size_limit": "0",
            # local delivery: virtual(8) into one Maildir, as nobody (virtual_minimum_uid 100)
            "virtual_mailbox_domains": "vlocal.test",
            "virtual_mailbox_base": str(self.vmail),
            "virtual_mailbox_maps": f"inline:{{{POSTFIX_LOCAL_RCPT}=vlocal.test/rcpt/}}",
            "virtual_uid_maps": f"static:{vuid}",
            "virtual_gid_maps": f"static:{vgid}",
            "virtual_mailbox_limit": "0",
            "maillog_file": str(self.base / "postfix.log"),
            "maillog_file_prefixes": str(self.base),
            "syslog_name": "postfix-mhbench",
            **(extra or {}),
        }
        (self.etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main.items()))
        (self.etc / "master.cf").write_text(_MASTER_CF.format(
            host=HOST, relay=self.relay_port, hold=self.hold_port))
        self._pf("check")

    def start(self) -> None:
        self._pf("start")
        self.running = True
        common.wait_port(self.relay_port, 30)
        common.wait_port(self.hold_port, 30)

    def master_pid(self) -> int:
        return int((self.queue / "pid" / "master.pid").read_text().split()[0])

    def stop(self) -> None:
        """`postfix stop` signals the master whose PID is in our own queue directory."""
        if not self.running:
            return
        with contextlib.suppress(Exception):
            pid = self.master_pid()
            self._pf("stop", check=False)
            for _ in range(300):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.05)
        self.running = False

    def kill_stale(self) -> None:
        with contextlib.suppress(Exception):
            self._pf("stop", check=False, timeout=30)

    def qsize(self) -> int:
        n = 0
        for sub in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _, _, files in os.walk(self.queue / sub):
                n += len(files)
        return n

    def clear_queue(self) -> None:
        common.run(["postsuper", "-c", str(self.etc), "-d", "ALL"], timeout=600, check=False)

    def clear_maildirs(self) -> None:
        """Move virtual(8)'s Maildir aside, as `common.fresh_dir` does with mailhaven's:
        virtual(8) makes it again on the next delivery."""
        common.to_trash(self.vmail / "vlocal.test" / "rcpt")

    def mailq(self) -> str:
        return common.run(["postqueue", "-c", str(self.etc), "-p"], timeout=600,
                          check=False).stdout

    def teardown(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def _ids(user: str) -> tuple[int, int]:
    import pwd

    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid
