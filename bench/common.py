"""Shared helpers of the benchmark suite: paths, loopback ports, processes, /proc probes.

Every process the suite starts goes through `spawn()` and is remembered, so `stop_all()` (run
at exit, also on Ctrl-C) stops each one by its own PID: SIGTERM, then SIGKILL after a grace
period. Nothing here ever signals a process it did not start.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TMP = BENCH / "tmp"
RESULTS = BENCH / "results"
VENV_PY = ROOT / ".venv" / "bin" / "python"
HOST = "127.0.0.1"

# smtp-source / smtp-sink: the copy unpacked by scripts/install-test-deps, else Debian's.
_TOOLS = ROOT / ".tools" / "postfix"


def postfix_tool(name: str) -> list[str]:
    """argv prefix that runs a Postfix test tool (smtp-source, smtp-sink)."""
    local = _TOOLS / "usr" / "sbin" / name
    if local.exists():
        return ["env", f"LD_LIBRARY_PATH={_TOOLS / 'usr/lib/postfix'}", str(local)]
    system = Path("/usr/sbin") / name
    if system.exists():
        return [str(system)]
    raise SystemExit(f"{name} not found: run scripts/install-test-deps (or apt-get install postfix)")


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------- ports
def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the kernel picks it)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def wait_port(port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> float:
    """Seconds until 127.0.0.1:port accepts a connection; raises after `timeout`."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if port_open(port):
            return time.perf_counter() - t0
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited ({proc.returncode}) before port {port}")
        time.sleep(0.01)
    raise RuntimeError(f"nothing listens on {HOST}:{port} after {timeout:.0f}s")


def wait_banner(port: int, timeout: float = 60.0) -> float:
    """Seconds until 127.0.0.1:port answers with an SMTP greeting (for restart timing)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            with socket.create_connection((HOST, port), timeout=timeout) as s:
                s.settimeout(max(0.1, timeout - (time.perf_counter() - t0)))
                if s.recv(512).startswith(b"220"):
                    return time.perf_counter() - t0
        except OSError:
            time.sleep(0.005)
    raise RuntimeError(f"no greeting from {HOST}:{port} after {timeout:.0f}s")


# --------------------------------------------------------------------------------- processes
_started: list[subprocess.Popen[bytes]] = []


def raise_nofile(want: int = 30000) -> int:
    """Raise our soft RLIMIT_NOFILE towards `want` (the hard limit permitting); children inherit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def spawn(argv: Sequence[str], *, log_to: Path | None = None, cwd: Path | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    out = open(log_to, "ab") if log_to else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                env=env, start_new_session=True)
    finally:
        if log_to:
            out.close()  # type: ignore[union-attr]
    _started.append(proc)
    return proc


def stop(proc: subprocess.Popen[bytes] | None, grace: float = 15.0) -> None:
    """SIGTERM the process we started (its PID only), SIGKILL after `grace` seconds."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=10)
    if proc in _started:
        _started.remove(proc)


def stop_all() -> None:
    """Stop every process started, and delete what `fresh_dir` set aside: the end of a
    command."""
    for proc in list(_started):
        stop(proc, grace=5.0)
    empty_trash()


def run(argv: Sequence[str], timeout: float = 120.0, check: bool = True,
        **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          check=check, **kw)  # type: ignore[call-overload]


# ------------------------------------------------------------------------------------ probes
_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int, children: bool = True) -> float:
    """utime+stime (+ reaped children) of a process, all threads, in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    ut, st, cut, cst = (int(x) for x in fields[11:15])
    return (ut + st + ((cut + cst) if children else 0)) / _TCK


def descendants(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], list(kids.get(root, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def tree_cpu(root: int) -> float:
    """CPU seconds of a process, its reaped children and its live descendants (Postfix)."""
    return proc_cpu(root) + sum(proc_cpu(p) for p in descendants(root))


def status_kib(pid: int, field: str) -> int:
    """A `kB` line of /proc/PID/status: VmRSS, VmHWM, ..."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_hwm(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def machine_cpu() -> tuple[int, int]:
    """(total jiffies, idle+iowait jiffies) over all CPUs."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v[:8]), v[3] + v[4]


def settle(pause: float) -> None:
    """Flush the previous run's dirty pages and let the machine go quiet."""
    subprocess.run(["sync"], check=False)
    time.sleep(pause)


#: Where `fresh_dir` moves what it replaces; emptied by `stop_all` when a command ends.
TRASH = TMP / "trash"


def fresh_dir(path: Path) -> Path:
    """An empty directory at `path`. What was there is moved aside, and deleted only when the
    command ends: ext4 passes over recently deleted inodes when it allocates new ones, so a run
    right after deleting the previous run's thousands of files pays extra for every file it
    makes (docs/benchmarks.md, "Method")."""
    to_trash(path)
    path.mkdir(parents=True)
    return path


def to_trash(path: Path) -> None:
    """Move `path` (if there) into the trash that `empty_trash` deletes when the command ends."""
    if path.exists():
        try:
            TRASH.mkdir(parents=True, exist_ok=True)
            path.rename(TRASH / f"{path.name}-{time.time_ns()}")
        except OSError:  # not on the same file system as TRASH
            shutil.rmtree(path, ignore_errors=True)


#: Written when the trash was emptied: the next command waits out ext4's window first.
_EMPTIED = TMP / ".trash-emptied"
#: ext4 treats an inode deleted less than a minute ago (after a sync) as recently deleted.
RECENT_S = 65.0


def empty_trash() -> None:
    if TRASH.exists():
        shutil.rmtree(TRASH, ignore_errors=True)
        subprocess.run(["sync"], check=False)
        _EMPTIED.touch()


def prepare_disk() -> None:
    """Keep the peers' files apart on disk, and wait until the last `empty_trash` is out of
    ext4's recently-deleted window (at most a minute).

    ext4 allocates a new file's inode in its directory's block group and passes over inodes
    deleted there in the last minute or more, so one peer's deletions (Postfix deletes a queue
    file per message) slow down another's file creation when their directories share a group.
    The top-directory flag (`chattr +T`) makes ext4 spread the directories made in TMP over
    the groups, as it does at the root of a file system."""
    TMP.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):  # no chattr, or not ext4: runs as before
        subprocess.run(["chattr", "+T", str(TMP)], check=False, capture_output=True)
    with contextlib.suppress(FileNotFoundError):
        wait = _EMPTIED.stat().st_mtime + RECENT_S - time.time()
        if wait > 0:
            print(f"waiting {wait:.0f} s: files deleted at the end of the last command",
                  flush=True)
            time.sleep(wait)


# ------------------------------------------------------------------------------------- stats
def setting(item: str) -> tuple[str, str, object]:
    """`TABLE.KEY=TOML` (a key without a table: top level) -> (table, key, value)."""
    key, _, value = item.partition("=")
    table, _, name = key.rpartition(".")
    return table, name, tomllib.loads(f"v = {value}")["v"]


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def python_version() -> str:
    return sys.version.split()[0]


def maildir_count(root: Path) -> int:
    """Messages delivered under `root`: files in every Maildir `new/` below it."""
    if not root.exists():
        return 0
    return sum(len(os.listdir(new)) for new in root.glob("**/new") if new.is_dir())
