"""Target 4: RSS per idle SMTP connection, and RSS growth while accepting one 100 MiB message.

Idle: a fresh server, its RSS (VmRSS, summed over the process and any children, so a
multi-process mailhaven is charged in full) before, then N connections held by
bench/idle_client.py (a separate process) for a moment, RSS again; per connection =
difference / N. Peer: aiosmtpd, the asyncio baseline (~11 KiB per connection measured).

Big message: a fresh server, VmHWM reset to the current RSS (clear_refs), one 100 MiB message
with smtp-source, then growth = VmHWM after - VmRSS before: the peak the DATA path needed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import load
import peers
from report import Goal, Metric


def tree_kib(pid: int, field: str) -> int:
    total = 0
    for p in [pid, *common.descendants(pid)]:
        with contextlib.suppress(OSError, KeyError):  # a child may exit meanwhile
            total += common.status_kib(p, field)
    return total


def reset_tree_hwm(pid: int) -> bool:
    return all([common.reset_hwm(p) for p in [pid, *common.descendants(pid)]])


Server = tuple[str, Callable[[], int], Callable[[], int], Callable[[], None]]


def mailhaven_server(name: str) -> Server:
    """(name, start -> port, pid, stop) for a fresh accept-only mailhaven."""
    mh = peers.Mailhaven(name, "hold")

    def start() -> int:
        common.fresh_dir(mh.dir)
        mh.start()
        return mh.port

    return ("mailhaven", start, lambda: mh.pid, mh.stop)


def aiosmtpd_server() -> Server:
    aio = peers.Aiosmtpd(common.VENV_PY)

    def start() -> int:
        aio.start()
        return aio.port

    return ("aiosmtpd-fsync", start, lambda: aio.pid, aio.stop)


def idle_once(server: Server, conns: int) -> dict[str, Any]:
    name, start, pid, stop = server
    port = start()
    try:
        time.sleep(1.0)
        before = tree_kib(pid(), "VmRSS")
        ready = common.TMP / f"idle-{name}.ready"
        ready.unlink(missing_ok=True)
        client = common.spawn([str(common.VENV_PY), str(common.BENCH / "idle_client.py"),
                               "--port", str(port), "--conns", str(conns), "--ready", str(ready)],
                              log_to=common.TMP / f"idle-{name}.log")
        open_s = wait_ready(ready, client.poll, timeout=120 + conns / 50)
        time.sleep(2.0)
        during = tree_kib(pid(), "VmRSS")
        common.stop(client)
        return {"conns": conns, "open_s": open_s, "rss_before_kib": before,
                "rss_with_conns_kib": during,
                "kib_per_conn": round((during - before) / conns, 2)}
    finally:
        stop()


def wait_ready(path: Path, poll: Callable[[], int | None], timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().startswith("READY"):
            return float(path.read_text().split()[2])
        if poll() is not None:
            raise RuntimeError(f"idle client exited early: see {path.with_suffix('.log')}")
        time.sleep(0.1)
    raise RuntimeError(f"idle client not ready after {timeout:.0f}s")


def big_once(server: Server, size: int) -> dict[str, Any]:
    _, start, pid, stop = server
    port = start()
    try:
        time.sleep(1.0)
        before = tree_kib(pid(), "VmRSS")
        hwm_reset = reset_tree_hwm(pid())
        rec = load.measure(port, lambda: common.tree_cpu(pid()), size=size, sessions=1, count=1)
        peak = tree_kib(pid(), "VmHWM")
        return {"size": size, "rss_before_kib": before, "hwm_after_kib": peak,
                "hwm_reset": hwm_reset, "ok": rec["ok"], "seconds": rec["accept_s"],
                "growth_mib": round((peak - before) / 1024, 2)}
    finally:
        stop()


def run(full: bool, reps: int, record: Callable[..., None]) -> list[Metric]:
    conns = 10_000 if full else 2_000
    idle = Metric(f"4a. {conns} idle SMTP connections", "RSS per connection", "KiB",
                  "mailhaven", [Goal("<=", 6.0), Goal("ratio<=", 1.0, "aiosmtpd-fsync")])
    big = Metric("4b. one 100 MiB message accepted", "RSS growth (VmHWM - VmRSS before)",
                 "MiB", "mailhaven", [Goal("<=", 32.0)])
    servers = [mailhaven_server("mem-mailhaven"), aiosmtpd_server()]
    for rep in range(reps):
        for server in servers if rep % 2 == 0 else servers[::-1]:
            rec = idle_once(server, conns)
            record("run", scenario=idle.target, system=server[0], rep=rep, **rec)
            common.log(f"  {server[0]:<16} rep {rep}: {rec['kib_per_conn']:.2f} KiB/conn "
                       f"(opened in {rec['open_s']:.1f}s)")
            idle.add(server[0], rec["kib_per_conn"])
    for rep in range(reps):
        for server in servers if rep % 2 == 0 else servers[::-1]:
            rec = big_once(server, 100 * 2**20)
            record("run", scenario=big.target, system=server[0], rep=rep, **rec)
            common.log(f"  {server[0]:<16} rep {rep}: +{rec['growth_mib']:.1f} MiB "
                       f"in {rec['seconds']:.1f}s" + ("" if rec["ok"] else "  NOT OK"))
            if rec["ok"]:
                big.add(server[0], rec["growth_mib"])
    return [idle, big]
