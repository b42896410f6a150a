"""Run a real `mailhaven serve` process for end-to-end tests (loopback only).

    server = MailServer(tmp_path, settings={"local_users": ["postmaster", "alice"]},
                        extra_toml='[limits]\\nrecipients = 100\\n')
    server.start()                      # waits until every listener accepts connections
    smtplib.SMTP(server.host, server.smtp_port) ...
    paths = server.wait_for_messages("alice", 1)
    server.stop()                       # SIGTERM, then SIGKILL after a timeout; returns the code

What it does:
- writes `mailhaven.toml` into its own directory (`<base>/server`, also the process's cwd), with a
  free loopback port for each service named in `services` (default: SMTP only) and every other
  listener switched off (`[]`), `state_dir = "state"` (relative to the cwd);
- outbound mail never leaves loopback: `[relay] nameservers` points at a loopback port where
  nothing answers (override it, e.g. with `tests.support.dns_server`, to test relaying); so
  `[inbound_auth] checks` is off unless a test turns it on with a DNS server of its own;
- `settings` (a nested dict) and `extra_toml` (TOML text, parsed and merged, so it may set
  top-level keys and tables in any order) override those defaults;
- runs `python -m mailhaven serve -c mailhaven.toml` with the test's interpreter (or any argv via
  `command`), stderr (the maillog) to `server.log_path`, stdout to `server.out_path`;
  `config_file=False` writes no file and runs on the built-in defaults (then pass `ports` and
  `settings` matching those defaults, e.g. `ports={"smtp": 2525}`, so waits and paths are right);
- stops only the process it started, by PID. `kill()` is SIGKILL (crash tests); `start()` again
  restarts on the same ports, config and state (the log file is appended to).

Use it as a context manager, or through a fixture that calls `stop()` at teardown. Every wait is
bounded by a deadline; nothing here sleeps to assert speed.

SECURITY: test code only. Listeners bind 127.0.0.1 (or whatever `host` says: keep it loopback).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from tests.fakes import free_port
from tests.support.logwatch import LogWatch

#: Every listener in `config.Listen`; those not in `services` are configured off.
SERVICES = ("smtp", "submission", "submissions", "pop3", "pop3s", "lmtp")
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
POLL = 0.02


class ServerError(RuntimeError):
    """The server did not start or stop as expected; the message includes its log tail."""




def port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    """True if a TCP connection to host:port succeeds right now (the server logs a connect)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_listening(port: int) -> bool | None:
    """True if some socket is in LISTEN state on `port` (Linux /proc/net/tcp{,6}); None when
    /proc is unavailable. Unlike `port_accepts` it leaves no connect/disconnect in the log."""
    seen = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        seen = True
        for line in lines:
            fields = line.split()
            if (
                len(fields) > 3
                and fields[3] == "0A"
                and int(fields[1].rsplit(":", 1)[1], 16) == port
            ):
                return True
    return False if seen else None


def merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge `override` into a copy of `base` (tables merge, everything else replaces)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def behind_milter(spec: str) -> dict[str, Any]:
    """Settings for the e2e milter tests: example.org with postmaster and alice, and `spec` as
    the one milter of the MX (smtpd) listener."""
    return {
        "local_domains": ["example.org"],
        "local_users": ["postmaster", "alice"],
        "checks": {"milter": {"smtpd": [spec]}},
    }


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return (
            "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
        )
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def to_toml(data: Mapping[str, Any]) -> str:
    """A small TOML writer: scalars and lists at top level, one level of `[tables]`.

    Tables nested deeper (e.g. `aliases`, a table of lists) are written as inline tables.
    """
    lines = [
        f"{_toml_key(k)} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, Mapping)
    ]
    for name, table in data.items():
        if not isinstance(table, Mapping):
            continue
        lines.append(f"\n[{_toml_key(name)}]")
        lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def terminate(proc: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM `proc` (ours, by its PID), wait up to `timeout`, then SIGKILL; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
    return proc.returncode


class MailServer(LogWatch):
    """One mailhaven process with its own directory, config, ports, state and log."""

    def __init__(
        self,
        base: Path,
        *,
        settings: Mapping[str, Any] | None = None,
        extra_toml: str = "",
        services: Sequence[str] = ("smtp",),
        ports: Mapping[str, int] | None = None,
        host: str = "127.0.0.1",
        hostname: str = "mx.test",
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        config_file: bool = True,
    ) -> None:
        unknown = set(services) - set(SERVICES)
        if unknown:
            raise ValueError(f"unknown service(s) {sorted(unknown)}; known: {SERVICES}")
        self.host = host
        self.dir = base / "server"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "mailhaven.toml"
        self.log_path = self.dir / "mailhaven.log"
        self.out_path = self.dir / "stdout.log"
        bracket = f"[{host}]" if ":" in host else host
        fixed = dict(ports or {})
        self.ports: dict[str, int] = {name: fixed.get(name) or free_port(host) for name in services}
        listen: dict[str, Any] = {name: [] for name in SERVICES}
        listen.update({name: [f"{bracket}:{port}"] for name, port in self.ports.items()})
        self.config: dict[str, Any] = {
            "hostname": hostname,
            "state_dir": "state",
            "listen": listen,
            # Never ask the real DNS from a test: a loopback port where nothing answers.
            "relay": {"nameservers": [f"127.0.0.1:{free_port()}"]},
            # Mail authentication needs DNS that answers: every untrusted message would wait
            # for the checks' 20 s deadline. Tests that serve DNS turn it on (test_mail_auth_*).
            "inbound_auth": {"checks": False},
        }
        self.config = merge(self.config, settings or {})
        if extra_toml:
            self.config = merge(self.config, tomllib.loads(extra_toml))
        serve = [sys.executable, "-m", "mailhaven", "serve"]
        if config_file:
            self.write_config()
            serve += ["-c", str(self.config_path)]
        self.command = list(command or serve)
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: BinaryIO | None = None
        self._out_file: BinaryIO | None = None

    # ------------------------------------------------------------------ configuration

    def write_config(self, text: str | None = None) -> None:
        """Write `self.config` (or raw `text`) to the config file (then `reload()` to apply)."""
        self.config_path.write_text(text if text is not None else to_toml(self.config))

    def update_config(self, settings: Mapping[str, Any]) -> None:
        """Merge `settings` into the config and rewrite the file (not applied until reload)."""
        self.config = merge(self.config, settings)
        self.write_config()

    @property
    def state_dir(self) -> Path:
        return self.dir / str(self.config.get("state_dir", "mailhaven-data"))

    @property
    def queue_db(self) -> Path:
        return self.state_dir / "spool" / "queue.db"

    def queued_messages(self) -> int:
        """Messages the queue database holds now, read-only (a delivered message leaves none)."""
        uri = f"{self.queue_db.as_uri()}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
            return int(db.execute("SELECT COUNT(*) FROM message").fetchone()[0])

    def send_test_message(self, to: str, subject: str) -> None:
        """A small message for `to` over SMTP from an outside sender (smtplib, port 25's role)."""
        with smtplib.SMTP(self.host, self.smtp_port, timeout=10) as smtp:
            smtp.sendmail("sender@client.test", [to], f"Subject: {subject}\r\n\r\nhi\r\n".encode())

    def queue_cli(self, *words: str) -> subprocess.CompletedProcess[str]:
        """`mailhaven queue WORDS` on this server's configuration; the caller checks the result."""
        return subprocess.run(
            [sys.executable, "-m", "mailhaven", "queue", "-c", str(self.config_path), *words],
            cwd=self.dir, capture_output=True, text=True, timeout=60, check=False,
        )

    @property
    def smtp_port(self) -> int:
        return self.ports["smtp"]

    def port(self, service: str) -> int:
        return self.ports[service]

    def maildir(self, user: str) -> Path:
        """`user@domain`'s Maildir, `<mail root>/<domain>/<user>`. A bare name is that user at
        whichever local domain has a Maildir for it (the first local domain when none or
        several do), so tests that name only the local part keep working."""
        local, _, domain = user.lower().partition("@")
        mail_dir = self.config.get("mailbox", {}).get("mail_dir")
        root = self.dir / mail_dir if mail_dir else self.state_dir / "mail"
        if domain:
            return root / domain / local
        domains = [str(d).lower() for d in self.config.get("local_domains") or ["localhost"]]
        found = [d for d in domains if (root / d / local).is_dir()]
        return root / (found[0] if len(found) == 1 else domains[0]) / local

    # ------------------------------------------------------------------ process life cycle

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ServerError("server not started")
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> MailServer:
        """Start the process and wait until every configured listener accepts a connection."""
        if self.running:
            raise ServerError("already running")
        self._close_files()
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in _close_files
        self._out_file = open(self.out_path, "ab")  # noqa: SIM115
        self._log_offset_at_start = self.log_path.stat().st_size
        self.proc = subprocess.Popen(
            self.command,
            cwd=self.dir,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._out_file,
            stderr=self._log_file,
        )
        self.wait_listening(timeout)
        return self

    def wait_listening(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        waiting = dict(self.ports)
        while waiting:
            if not self.running:
                raise ServerError(
                    f"server exited with {self.returncode} during start-up\n{self.log_tail()}"
                )
            for name, port in list(waiting.items()):
                listening = port_listening(port)
                if listening is None:
                    listening = port_accepts(self.host, port)
                if listening:
                    del waiting[name]
            if time.monotonic() > deadline:
                raise ServerError(
                    f"listeners {waiting} not ready after {timeout}s\n{self.log_tail()}"
                )
            if waiting:
                time.sleep(POLL)

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: int) -> None:
        """Send `sig` to our process (only if it is still running)."""
        if self.running:
            os.kill(self.pid, sig)

    def reload(self) -> None:
        self.signal(signal.SIGHUP)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit code (negative: signal)."""
        if self.proc is None:
            return 0
        try:
            return terminate(self.proc, timeout)
        finally:
            self._close_files()

    def kill(self) -> None:
        """SIGKILL now (a crash): no shutdown code runs."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(STOP_TIMEOUT)
        self._close_files()

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to exit by itself; ServerError if it does not within timeout."""
        if self.proc is None:
            raise ServerError("server not started")
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ServerError(f"server still running after {timeout}s\n{self.log_tail()}") from None

    def _close_files(self) -> None:
        for fh in (self._log_file, self._out_file):
            if fh is not None:
                fh.close()
        self._log_file = self._out_file = None

    def __enter__(self) -> MailServer:
        return self.start() if not self.running else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ observation

    def log(self) -> str:
        """The whole maillog so far (all runs)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""


    def messages(self, user: str, folder: str = "") -> list[Path]:
        """Files in `<maildir>/new` and `cur` (of Maildir++ `folder`, e.g. "Junk", when given),
        sorted by name (Maildir names start with time). A bare name collects that user's
        messages at every local domain."""
        if "@" in user:
            roots = [self.maildir(user)]
        else:
            domains = self.config.get("local_domains") or ["localhost"]
            roots = list(dict.fromkeys(self.maildir(f"{user}@{d}") for d in domains))
        if folder:
            roots = [root / f".{folder}" for root in roots]
        found: list[Path] = []
        for root in roots:
            for sub in ("new", "cur"):
                with contextlib.suppress(FileNotFoundError):
                    found.extend(p for p in (root / sub).iterdir() if p.is_file())
        return sorted(found, key=lambda p: p.name)

    def wait_for_mark(
        self, user: str, mark: str, *, timeout: float = 10.0, folder: str = ""
    ) -> bytes:
        """The content of the message in `user`'s Maildir (or its `folder`) that carries `mark`."""
        deadline = time.monotonic() + timeout
        while True:
            for path in self.messages(user, folder):
                data = path.read_bytes()
                if mark.encode() in data:
                    return data
            if time.monotonic() > deadline:
                raise AssertionError(f"no message {mark} for {user}\n{self.log_tail()}")
            time.sleep(POLL)

    def wait_for_messages(self, user: str, count: int, *, timeout: float = 10.0) -> list[Path]:
        """Wait until `user`'s Maildir holds at least `count` messages; return them all."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages(user)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{user}: {len(found)} message(s) in {self.maildir(user)}, wanted {count}\n"
                    f"{self.log_tail()}"
                )
            if self.proc is not None and not self.running:
                raise ServerError(f"server exited with {self.returncode}\n{self.log_tail()}")
            time.sleep(POLL)

    def memory(self) -> dict[str, int]:
        """`Vm*` lines of /proc/<pid>/status, in KiB (Linux): VmRSS, VmHWM, ..."""
        out: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.startswith("Vm") and value.strip().endswith("kB"):
                out[name] = int(value.split()[0])
        return out


# ---------------------------------------------------------------------- message helpers


def split_trace(data: bytes, *, received: int = 1) -> tuple[list[bytes], bytes]:
    """Split a delivered file into (Return-Path, Delivered-To and `received` Received: fields,
    each unfolded without its line end) and the rest, exactly as it was stored.

    Raises AssertionError when the file does not start with those fields in that order.
    """
    fields: list[bytes] = []
    rest = data
    wanted = [b"return-path", b"delivered-to"] + [b"received"] * received
    for name in wanted:
        end = 0
        while True:
            nl = rest.find(b"\n", end)
            if nl < 0:
                raise AssertionError(f"truncated trace field in {data[:300]!r}")
            end = nl + 1
            if rest[end : end + 1] not in (b" ", b"\t"):
                break
        raw = rest[:end]
        field_name = raw.split(b":", 1)[0].strip().lower()
        if field_name != name:
            raise AssertionError(f"expected {name!r} field, got {raw[:80]!r}")
        fields.append(b" ".join(part.strip() for part in raw.splitlines()))
        rest = rest[end:]
    return fields, rest


def queue_id_of(data: bytes) -> str:
    """The queue id in our `Received: ... id <QID>` trace field."""
    match = re.search(rb"\(mailhaven\)(?: with \S+)? id ([A-Za-z0-9]+)", data[:8192])
    if match is None:
        raise AssertionError(f"no mailhaven Received: id in {data[:300]!r}")
    return match.group(1).decode()


def to_lf(data: bytes) -> bytes:
    """CRLF -> LF (what the Maildir store does)."""
    return data.replace(b"\r\n", b"\n")


@contextlib.contextmanager
def running(server: MailServer) -> Iterator[MailServer]:
    """`with running(MailServer(...)) as s:` start, yield, always stop."""
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------- a raw line client


class RawClient:
    """A byte-level SMTP/POP3 client for tests that need exact control of the wire.

    `reply()` reads one SMTP reply (all lines of a multi-line reply) as (code, [texts]);
    `line()` reads one raw line. Every read has `timeout`; EOF raises `ConnectionClosed`.
    """

    def __init__(self, host: str, port: int, *, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buffer = bytearray()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionClosed(bytes(self.buffer))
        self.buffer += chunk

    def line(self) -> bytes:
        """One line including its line end."""
        while (nl := self.buffer.find(b"\n")) < 0:
            self._fill()
        out = bytes(self.buffer[: nl + 1])
        del self.buffer[: nl + 1]
        return out

    def reply(self) -> tuple[int, list[str]]:
        texts: list[str] = []
        while True:
            raw = self.line().decode("utf-8", "replace").rstrip("\r\n")
            if len(raw) < 3 or not raw[:3].isdigit():
                raise AssertionError(f"not an SMTP reply line: {raw!r}")
            texts.append(raw[4:])
            if raw[3:4] != "-":
                return int(raw[:3]), texts

    def replies(self, count: int) -> list[tuple[int, list[str]]]:
        return [self.reply() for _ in range(count)]

    def command(self, line: bytes | str) -> tuple[int, list[str]]:
        """Send one command line (CRLF is added) and read its reply."""
        data = line.encode() if isinstance(line, str) else line
        self.send(data + b"\r\n")
        return self.reply()

    def read_to_eof(self) -> bytes:
        """Everything until the server closes the connection (bounded by the timeout)."""
        try:
            while True:
                self._fill()
        except ConnectionClosed:
            pass
        out = bytes(self.buffer)
        self.buffer.clear()
        return out

    def is_closed_by_peer(self) -> bool:
        """True if the server closes the connection (EOF or reset) within the timeout; False if
        it sends more data or stays silent until the timeout."""
        try:
            self._fill()
        except ConnectionClosed:
            return True
        except TimeoutError:
            return False
        except OSError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ConnectionClosed(EOFError):
    """The peer closed the connection; `args[0]` holds unread buffered bytes."""
