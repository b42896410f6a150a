"""One measured load run: `smtp-source` against a port, timed, with the server's CPU.

Why smtp-source: it is the C client the peers were measured with (see
../shared/reference/perf-baseline.md), so a Python client's own limits never cap a number.
Without `-d` it opens a new connection per message (EHLO, MAIL, RCPT, DATA, QUIT each time).

Every run is bounded by a wall-clock timeout; on timeout smtp-source is killed (by its PID)
and the record says so. "End to end" runs also wait, bounded, until `drained()` is true
(the server's queue is empty, i.e. the sink answered 250 for every message).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import common
from common import HOST

SENDER = "sender@bench.test"


def source_argv(port: int, *, size: int, sessions: int, count: int,
                rcpt: str = "rcpt@bench.test", sender: str = SENDER,
                extra: Sequence[str] = ()) -> list[str]:
    """`extra`: more smtp-source options, e.g. `-F file` (send that prepared message, whose
    size then is the file's: smtp-source refuses -l with -F)."""
    length = [] if "-F" in extra else ["-l", str(size)]
    return [*common.postfix_tool("smtp-source"), "-s", str(sessions), "-m", str(count),
            *length, "-f", sender, "-t", rcpt, "-M", "client.bench.test", *extra,
            f"{HOST}:{port}"]


def wait_quiet(limit_pct: float = 30.0, max_wait: float = 5.0) -> float:
    """Wait (bounded) until the machine is nearly idle; returns the last busy % sampled.

    Other sessions may run tests on this machine; a short wait skips most of their bursts
    without letting a busy neighbour stall the suite."""
    deadline = time.monotonic() + max_wait
    while True:
        m0 = common.machine_cpu()
        time.sleep(0.5)
        m1 = common.machine_cpu()
        busy = 100 * (os.cpu_count() or 1) * (1 - (m1[1] - m0[1]) / max(m1[0] - m0[0], 1))
        if busy < limit_pct or time.monotonic() >= deadline:
            return round(busy, 1)


def measure(port: int, cpu: Callable[[], float], *, size: int, sessions: int, count: int,
            rcpt: str = "rcpt@bench.test", drained: Callable[[], bool] | None = None,
            timeout: float = 600.0, sender: str = SENDER,
            extra: Sequence[str] = (), client: Sequence[str] | None = None) -> dict[str, Any]:
    """Run smtp-source once; returns a JSON-able record (rates, CPU ms/msg, machine load).
    `client`: another load client's argv instead (tls_load.py), same exit-status contract."""
    argv = list(client) if client is not None else source_argv(
        port, size=size, sessions=sessions, count=count, rcpt=rcpt, sender=sender, extra=extra)
    m0, c0, r0 = common.machine_cpu(), cpu(), os.times()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    timed_out = False
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        timed_out = True
    accept_s = time.perf_counter() - t0
    rec: dict[str, Any] = {
        "cmd": " ".join(["smtp-source", *argv[argv.index("-s"):]] if client is None else argv),
        "size": size, "sessions": sessions, "count": count, "rc": proc.returncode,
        "accept_s": round(accept_s, 3), "msgs_per_s": round(count / accept_s, 2),
    }
    if drained is not None:
        deadline = t0 + timeout
        while not drained() and time.perf_counter() < deadline:
            time.sleep(0.02)  # as in perf-baseline.md: polling costs the harness some CPU
        e2e_s = time.perf_counter() - t0
        rec.update(e2e_s=round(e2e_s, 3), e2e_msgs_per_s=round(count / e2e_s, 2),
                   drained=drained())
    c1, r1, m1 = cpu(), os.times(), common.machine_cpu()
    client = (r1.children_user + r1.children_system) - (r0.children_user + r0.children_system)
    total, idle = m1[0] - m0[0], m1[1] - m0[1]
    busy = 100 * (os.cpu_count() or 1) * (total - idle) / max(total, 1)
    wall = rec.get("e2e_s", accept_s)
    # what neither the server nor smtp-source used: other processes (the sink, other
    # sessions' tests on a shared machine), i.e. how noisy this run was
    others = busy - 100 * ((c1 - c0) + client) / wall
    rec.update(server_cpu_ms_per_msg=round(1000 * (c1 - c0) / count, 3),
               client_cpu_ms_per_msg=round(1000 * client / count, 3),
               machine_busy_pct=round(busy, 1), others_busy_pct=round(max(others, 0.0), 1))
    text = err.decode(errors="replace").strip()
    if text:
        rec["stderr"] = text[-400:]
    rec["ok"] = proc.returncode == 0 and not timed_out and rec.get("drained", True)
    return rec
