"""What `smtp_processes = 2` buys: mailhaven against itself, one process vs two, alternating.

    .venv/bin/python bench/processes_ab.py relay     # or: hold (acceptance only)
    .venv/bin/python bench/processes_ab.py hold --count 5000 --reps 3

Why a separate command: `run.py --set smtp_processes=2` compares two processes with Postfix
(the issue's targets), but two such runs happen minutes apart, and this machine's speed drifts
within minutes. Here both configurations alternate in one invocation against the same
smtp-sink, so their ratio is the option's gain. Prints one line per run and the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import common
import load
import peers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["relay", "hold"])
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    rates: dict[int, list[float]] = {1: [], 2: []}
    sink = peers.SmtpSink("ab-sink")
    sink.start()
    try:
        for rep in range(a.reps):
            for n in (1, 2) if rep % 2 == 0 else (2, 1):
                mh = peers.Mailhaven(f"ab-{n}p", a.mode, sink_port=sink.port,
                                     extra={"": {"smtp_processes": n}})
                common.fresh_dir(mh.dir)
                mh.start()
                time.sleep(1.0)  # the worker process starts after the daemon's greeting
                load.wait_quiet()
                rec = load.measure(
                    mh.port, lambda mh=mh: common.tree_cpu(mh.pid), size=1024, sessions=10,
                    count=a.count,
                    drained=(lambda mh=mh: mh.queue_count() == 0) if a.mode == "relay" else None,
                )
                mh.stop()
                rate = rec.get("e2e_msgs_per_s", rec["msgs_per_s"])
                common.log(f"smtp_processes={n} rep {rep}: {rate:8.1f} msg/s, "
                           f"cpu {rec['server_cpu_ms_per_msg']:.2f} ms/msg, "
                           f"machine {rec['machine_busy_pct']:.0f}% busy")
                if rec["ok"]:
                    rates[n].append(rate)
    finally:
        sink.stop()
        common.stop_all()
    one, two = (statistics.median(rates[n]) if rates[n] else 0.0 for n in (1, 2))
    common.log(f"median: 1 process {one:.0f} msg/s, 2 processes {two:.0f} msg/s, "
               f"ratio {two / one if one else float('nan'):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
