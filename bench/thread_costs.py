"""Where a scenario's CPU goes, thread by thread, and how often each thread is switched out.

    .venv/bin/python bench/thread_costs.py {local,hold} [--count 6000] [--size 1024]

Runs mailhaven with the defaults under the acceptance load (`smtp-source`, 10 sessions, a new
connection per message) and reads `/proc/<pid>/task/<tid>/{stat,status}` of every engine
process before and after: per thread, user and system CPU and voluntary and involuntary
context switches, each per message that process handled (the load split evenly between the
engine processes). What docs/benchmarks.md says
about the event loop being preempted by the Maildir copy threads comes from here.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import common
import load
import peers

Counts = dict[str, tuple[str, int, int, int, int]]  # tid -> name, utime, stime, vol, invol


def threads(pid: int) -> Counts:
    out: Counts = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        status = dict(
            line.split(":\t", 1)
            for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines()
            if ":\t" in line
        )
        out[tid] = (status["Name"].strip(), int(fields[11]), int(fields[12]),
                    int(status["voluntary_ctxt_switches"]),
                    int(status["nonvoluntary_ctxt_switches"]))
    return out


def engines(root: int) -> list[int]:
    kids = subprocess.run(["pgrep", "-P", str(root)], capture_output=True, text=True).stdout
    pids = [root] + [int(p) for p in kids.split()]
    return [p for p in pids if b"mailhaven" in Path(f"/proc/{p}/cmdline").read_bytes()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["local", "hold"])
    ap.add_argument("--count", type=int, default=6000)
    ap.add_argument("--size", type=int, default=1024)
    a = ap.parse_args()
    common.prepare_disk()
    mh = peers.Mailhaven("threads-mh", a.mode)
    common.fresh_dir(mh.dir)
    mh.start()
    try:
        pids = engines(mh.pid)
        before = {p: threads(p) for p in pids}
        rec = load.measure(mh.port, lambda: common.tree_cpu(mh.pid), size=a.size, sessions=10,
                           count=a.count,
                           rcpt=peers.LOCAL_RCPT if a.mode == "local" else "rcpt@bench.test",
                           drained=(lambda: mh.queue_count() == 0) if a.mode == "local" else None)
        after = {p: threads(p) for p in pids}
        common.log(f"{a.mode}: {rec['msgs_per_s']:.0f} msg/s, server CPU "
                   f"{rec['server_cpu_ms_per_msg']:.2f} ms/msg, {len(pids)} engine process(es)")
        per = a.count / len(pids)  # messages one process handled, about
        hz = os.sysconf("SC_CLK_TCK")
        for p in pids:
            for tid, (name, user, system, vol, invol) in sorted(after[p].items()):
                _, user0, system0, vol0, invol0 = before[p].get(tid, (name, 0, 0, 0, 0))
                if (vol - vol0) + (invol - invol0) < per / 100:
                    continue  # idle through the run
                common.log(f"  {p} {tid} {name:<16} user {1e3 * (user - user0) / hz / per:.3f} "
                           f"sys {1e3 * (system - system0) / hz / per:.3f} ms/msg, switches "
                           f"voluntary {(vol - vol0) / per:.2f} involuntary "
                           f"{(invol - invol0) / per:.2f} per msg")
    finally:
        mh.stop()
        common.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
