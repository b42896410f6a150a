"""Running as the service user (`user`/`group`): validation, `config check`'s mode warnings, and
a real `mailhaven serve` started as root that binds a port below 1024 and drops to `nobody`.

The drop test never touches the system's accounts: it uses `nobody`/`nogroup`, which Debian
always has, and a state directory in a throwaway directory under /tmp.
"""

from __future__ import annotations

import os
import pwd
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.server import free_port, port_listening, terminate

import mailhaven
from mailhaven.config import ConfigError, load
from mailhaven.runtime import privileges

CHECK = [sys.executable, "-m", "mailhaven", "config", "check", "-c"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('user = "no-such-user-mh"', "user: no such user 'no-such-user-mh'"),
        ('user = "root"', "user: 'root' is root"),
        ('user = "nobody"\ngroup = "no-such-group-mh"', "group: no such group 'no-such-group-mh'"),
        ('group = "nogroup"', "group: only with user"),
    ],
)
def test_bad_user_or_group_is_a_clear_config_error(
    tmp_path: Path, toml: str, message: str
) -> None:
    path = write(tmp_path / "m.toml", toml + "\n")
    with pytest.raises(ConfigError, match=message):
        load(path)
    done = subprocess.run([*CHECK, str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_known_user_loads_and_group_defaults_to_its_own() -> None:
    nobody = pwd.getpwnam("nobody")
    who = privileges.resolve("nobody")
    assert (who.uid, who.gid) == (nobody.pw_uid, nobody.pw_gid)


def test_config_check_warns_about_loose_modes_but_passes(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "tls").mkdir(parents=True)
    key = write(state / "tls" / "selfsigned.key", "key")
    users = write(state / "users.passwd", "")
    state.chmod(0o755)
    key.chmod(0o644)
    users.chmod(0o644)
    path = write(tmp_path / "m.toml", f'hostname = "mx.example.org"\nstate_dir = "{state}"\n')
    done = subprocess.run([*CHECK, str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "configuration is valid" in done.stdout
    assert f"warning: state directory {state} has mode 0755; expected at most 0750" in done.stderr
    assert f"warning: private key {key} has mode 0644; expected at most 0600" in done.stderr
    assert f"warning: users file {users} has mode 0644; expected at most 0640" in done.stderr
    state.chmod(0o750)
    key.chmod(0o600)
    users.chmod(0o640)
    done = subprocess.run([*CHECK, str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "warning" not in done.stderr


# ---------------------------------------------------------------------- a real drop as root

NOBODY = "nobody"
#: where the package and its dependencies are, for an interpreter the service user can run
PYTHONPATH = os.pathsep.join(
    [str(Path(mailhaven.__file__).parent.parent), str(Path(pytest.__file__).parent.parent)]
)


def interpreter_for(uid: int, gid: int) -> str | None:
    """A Python of our version that `uid` can execute and that imports mailhaven as it: ours, or
    the system's (ours may live under root's home)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, f"/usr/bin/{version}"):
        try:
            ok = subprocess.run(
                [candidate, "-c", "import mailhaven.app"], user=uid, group=gid,
                env={"PYTHONPATH": PYTHONPATH}, cwd="/", capture_output=True, timeout=60,
                check=False,
            )
        except OSError:
            continue
        if ok.returncode == 0:
            return candidate
    return None


def ids(pid: int) -> dict[str, list[int]]:
    """The Uid, Gid and Groups lines of /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            out[key] = [int(v) for v in value.split()]
    return out


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            if f"\nPPid:\t{pid}\n" in status:
                found.append(int(entry.name))
    return found


def low_free_port() -> int:
    """A free loopback port below 1024 (only root may bind it)."""
    for port in range(1023, 900, -1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024 on loopback")


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory the service user can reach (pytest's tmp_path is root's, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="mailhaven-privileges-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def wait_for(check: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not callable(check) or not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout}s")
        time.sleep(0.05)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs a test run as root")
def test_started_as_root_binds_a_low_port_then_runs_as_the_user(world_dir: Path) -> None:
    account = pwd.getpwnam(NOBODY)
    uid, gid = account.pw_uid, account.pw_gid
    python = interpreter_for(uid, gid)
    if python is None:
        pytest.skip(f"no Python that {NOBODY} may run and that imports mailhaven")
    port = low_free_port()
    state = world_dir / "state"
    config = write(world_dir / "mailhaven.toml", f"""\
hostname = "mx.test"
state_dir = "{state}"
user = "{NOBODY}"
smtp_processes = 2
[listen]
smtp = ["127.0.0.1:{port}"]
submission = []
submissions = []
pop3 = []
pop3s = []
[relay]
nameservers = ["127.0.0.1:{free_port()}"]
""")
    config.chmod(0o644)  # the workers, started as the user, read it too
    log = world_dir / "mailhaven.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [python, "-m", "mailhaven", "serve", "-c", str(config)],
            env=dict(os.environ, PYTHONPATH=PYTHONPATH, PYTHONUNBUFFERED="1"),
            cwd=world_dir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
        )
    try:
        wait_for(lambda: proc.poll() is not None or (
            port_listening(port) and b"worker 1 ready" in log.read_bytes()
        ), "listening and worker ready")
        assert proc.poll() is None, log.read_text()
        daemon = ids(proc.pid)
        assert daemon["Uid"] == [uid] * 4 and daemon["Gid"] == [gid] * 4, daemon
        assert 0 not in daemon["Groups"]
        workers = children(proc.pid)
        assert len(workers) == 1
        assert ids(workers[0])["Uid"] == [uid] * 4
        assert state.stat().st_uid == uid and (state.stat().st_mode & 0o777) == 0o750

        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("a@example.org", ["postmaster@localhost"], b"Subject: x\r\n\r\nhi\r\n")
        new = state / "mail" / "localhost" / "postmaster" / "new"
        wait_for(lambda: new.is_dir() and any(new.iterdir()), "delivery")
        for message in new.iterdir():
            assert (message.stat().st_uid, message.stat().st_gid) == (uid, gid)
        assert (state / "spool").stat().st_uid == uid
        assert (state / "control.sock").stat().st_uid == uid
    finally:
        terminate(proc, 30)
    assert proc.returncode == 0, log.read_text()
    assert f"running as user {NOBODY}" in log.read_text()
