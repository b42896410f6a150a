"""The floor under every SMTP scenario: Postfix's C `smtp-sink` answering the same load.

    .venv/bin/python bench/sink_floor.py [--count 6000] [--reps 3] [--size 1024]

smtp-sink (one process, no storage, no log) answers `smtp-source` sessions exactly as the
acceptance scenario drives mailhaven and Postfix: 10 sessions, a new connection per message.
What it spends per message is what the protocol's round trips and loopback TCP cost a server
written in C; the difference to a real server is that server's own work. Prints one line per
run: rate, the sink's and the client's CPU per message.
"""

from __future__ import annotations

import argparse
import sys

import common
import load
import peers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=6000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size", type=int, default=1024)
    a = ap.parse_args()
    common.prepare_disk()
    sink = peers.SmtpSink("floor-sink")
    sink.start()
    try:
        assert sink.proc is not None
        pid = sink.proc.pid
        for rep in range(a.reps):
            load.wait_quiet()
            rec = load.measure(sink.port, lambda: common.proc_cpu(pid), size=a.size,
                               sessions=10, count=a.count)
            common.log(f"smtp-sink rep {rep}: {rec['msgs_per_s']:8.1f} msg/s, "
                       f"sink cpu {rec['server_cpu_ms_per_msg']:.3f} ms/msg, "
                       f"client cpu {rec['client_cpu_ms_per_msg']:.3f} ms/msg, "
                       f"machine {rec['machine_busy_pct']:.0f}% busy")
    finally:
        sink.stop()
        common.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
