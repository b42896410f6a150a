"""Acceptance with rspamd attached as a milter: mailhaven against Postfix, same rspamd, same run.

    .venv/bin/python bench/milter.py                    # 1 KiB, 10 sessions, 4 repetitions
    .venv/bin/python bench/milter.py --count 3000 --reps 6 --size 10240
    .venv/bin/python bench/milter.py --set smtp_processes=2   # any mailhaven setting

One private rspamd (`tests/support/rspamd.py`: rspamd_proxy, milter = yes, self-scan, no redis,
DNS to a loopback server that knows nothing) serves both MTAs. mailhaven-hold gets
`[checks.milter] smtpd = [rspamd]`, the Postfix peer (bench/peers.py, its HOLD listener) gets
`smtpd_milters = inet:127.0.0.1:PORT` and `milter_default_action = tempfail`. Both accept
durably, deliver nothing; the client is smtp-source (a new connection per message). The
systems alternate, the order flipped every repetition; each run starts from an empty queue.
A run counts only if smtp-source exited 0 and every message is in the queue (so none was
refused by rspamd or a tempfail). Prints one line per run (msg/s, MTA CPU and rspamd CPU per
message) and the medians with their ratio (goal: mailhaven >= 1.5x Postfix). JSON lines go
to bench/results/milter-<UTC time>.jsonl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import common
import load
import peers

sys.path.insert(0, str(common.ROOT))
from tests.support.dns_server import DNSServer
from tests.support.rspamd import RspamdInstance

GOAL = 1.5


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--rspamd-workers", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=TOML",
                    help="a mailhaven setting, as run.py's --set (e.g. smtp_processes=2)")
    a = ap.parse_args()
    results = common.ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"milter-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.jsonl"
    rates: dict[str, list[float]] = {"mailhaven": [], "postfix": []}
    sink = peers.SmtpSink("milter-sink")
    with DNSServer({}) as dns, RspamdInstance(dns.address, workers=a.rspamd_workers) as rspamd, \
            out.open("w") as record:
        common.log(f"rspamd milter on {rspamd.spec} ({a.rspamd_workers} workers)")
        sink.start()
        pf = peers.Postfix(sink.port)
        pf.setup({"smtpd_milters": rspamd.spec, "milter_default_action": "tempfail"})
        pf.start()
        extra: dict[str, dict[str, object]] = {
            "checks.milter": {"smtpd": [rspamd.spec], "reuse": [rspamd.spec]}}
        for item in a.set:
            table, key, value = common.setting(item)
            extra.setdefault(table, {})[key] = value
        mh = peers.Mailhaven("milter-mh", "hold", extra=extra)
        try:
            for rep in range(a.reps):
                order = ["mailhaven", "postfix"] if rep % 2 == 0 else ["postfix", "mailhaven"]
                for name in order:
                    if name == "mailhaven":
                        mh.stop()
                        common.fresh_dir(mh.dir)
                        mh.start()
                        port, cpu, stored = mh.port, (lambda: common.tree_cpu(mh.pid)), mh.queue_count
                    else:
                        pf.clear_queue()
                        port, cpu, stored = pf.hold_port, (lambda: common.tree_cpu(pf.master_pid())), pf.qsize
                    common.settle(1.0)
                    load.wait_quiet()
                    scan0 = common.tree_cpu(rspamd.proc.pid) if rspamd.proc else 0.0
                    rec = load.measure(port, cpu, size=a.size, sessions=a.sessions, count=a.count)
                    scan1 = common.tree_cpu(rspamd.proc.pid) if rspamd.proc else 0.0
                    rec["stored"] = stored()
                    rec["ok"] = rec["ok"] and rec["stored"] == a.count
                    rec["rspamd_cpu_ms_per_msg"] = round(1000 * (scan1 - scan0) / a.count, 3)
                    record.write(json.dumps({"system": name, "rep": rep, **rec}) + "\n")
                    common.log(f"{name:<10} rep {rep}: {rec['msgs_per_s']:8.1f} msg/s  "
                               f"MTA cpu {rec['server_cpu_ms_per_msg']:.2f} ms/msg  "
                               f"rspamd cpu {rec['rspamd_cpu_ms_per_msg']:.2f} ms/msg  "
                               f"others {rec['others_busy_pct']:.0f}% busy"
                               + ("" if rec["ok"] else f"  NOT OK (stored {rec['stored']})"))
                    if rec["ok"]:
                        rates[name].append(rec["msgs_per_s"])
        finally:
            mh.stop()
            pf.stop()
            pf.teardown()
            sink.stop()
            common.stop_all()
    med = {k: statistics.median(v) if v else 0.0 for k, v in rates.items()}
    ratio = med["mailhaven"] / med["postfix"] if med["postfix"] else float("nan")
    common.log(f"median: mailhaven {med['mailhaven']:.0f} msg/s, postfix {med['postfix']:.0f} "
               f"msg/s; ratio {ratio:.2f}x (goal >= {GOAL}x: {'met' if ratio >= GOAL else 'NOT met'})")
    common.log(f"results: {out}")
    return 0 if ratio >= GOAL else 1


if __name__ == "__main__":
    raise SystemExit(main())
