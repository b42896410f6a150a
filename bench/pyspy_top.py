"""Where mailhaven's time goes under load: py-spy samples of the server during one scenario.

    .venv/bin/python bench/pyspy_top.py accept_1k      # or relay_1k, accept_100k
    .venv/bin/python bench/pyspy_top.py relay_1k --count 20000 --top 25
    .venv/bin/python bench/pyspy_top.py local_1k                       # into a Maildir
    .venv/bin/python bench/pyspy_top.py local_100k --count 3000
    .venv/bin/python bench/pyspy_top.py accept_tls_resumed_1k --gil   # or accept_tls_1k
    .venv/bin/python bench/pyspy_top.py relay_1k --native --set 'event_loop="uvloop"'

Starts mailhaven (hold or relay mode, plus a sink for relay), attaches `py-spy record` to its
PID (all threads, idle frames excluded, raw collapsed stacks), runs smtp-source (the TLS
scenarios: tls_bench.py's client) against it, and prints the functions with the most samples:
"self" (the sample's innermost frame) and "total" (anywhere on the stack), as % of the samples. The collapsed stacks stay in
bench/tmp/profile/<scenario>.txt for a flame graph. Why py-spy: it samples from outside, so
the server runs unmodified and at nearly full speed.
"""

from __future__ import annotations

import argparse
import collections
import signal
import sys
import time

import common
import load
import peers
import tls_bench

SIZES = {"accept_1k": 1024, "relay_1k": 1024, "accept_100k": 102400, "local_1k": 1024,
         "local_100k": 102400, "accept_tls_1k": 1024, "accept_tls_resumed_1k": 1024}
#: scenarios that deliver into a Maildir (mail to peers.LOCAL_RCPT), measured until delivered
LOCAL = {"local_1k", "local_100k"}
#: STARTTLS on every connection (tls_bench.py's client and ECDSA certificate)
TLS = {"accept_tls_1k": False, "accept_tls_resumed_1k": True}


def top(stacks: dict[str, int], n: int) -> list[str]:
    total = sum(stacks.values()) or 1
    own: collections.Counter[str] = collections.Counter()
    anywhere: collections.Counter[str] = collections.Counter()
    for stack, count in stacks.items():
        frames = stack.split(";")
        own[frames[-1]] += count
        for frame in set(frames):
            anywhere[frame] += count
    lines = [f"{total} samples", "", "self %  function"]
    lines += [f"{100 * c / total:6.1f}  {f}" for f, c in own.most_common(n)]
    lines += ["", "total %  function"]
    lines += [f"{100 * c / total:6.1f}  {f}" for f, c in anywhere.most_common(n)]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=sorted(SIZES))
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=TOML",
                    help="a mailhaven setting, as run.py's --set (repeatable)")
    ap.add_argument("--rate", type=int, default=200, help="samples per second")
    ap.add_argument("--gil", action="store_true", help="only samples holding the GIL")
    ap.add_argument("--native", action="store_true",
                    help="also sample C frames (py-spy --native: SQLite, the event loop, libc)")
    a = ap.parse_args()
    for item in a.set:
        table, key, value = common.setting(item)
        peers.Mailhaven.overrides.setdefault(table, {})[key] = value
    out_dir = common.fresh_dir(common.TMP / "profile")
    raw = out_dir / f"{a.scenario}.txt"
    sink = None
    try:
        if a.scenario == "relay_1k":
            sink = peers.SmtpSink("profile-sink")
            sink.start()
            mh = peers.Mailhaven("profile-mailhaven", "relay", sink_port=sink.port)
        elif a.scenario in LOCAL:
            mh = peers.Mailhaven("profile-mailhaven", "local")
        elif a.scenario in TLS:
            cert, key = tls_bench.make_cert("ec", out_dir / "certs")
            mh = peers.Mailhaven("profile-mailhaven", "hold",
                                 extra={"tls": {"cert": str(cert), "key": str(key)}})
        else:
            mh = peers.Mailhaven("profile-mailhaven", "hold")
        common.fresh_dir(mh.dir)
        mh.start()
        spy = common.spawn([str(common.ROOT / ".venv" / "bin" / "py-spy"), "record", "--pid",
                            str(mh.pid), "--format", "raw", "--output", str(raw), "--threads",
                            "--rate", str(a.rate), *(["--gil"] if a.gil else []),
                            # native frames need the process paused per sample (slower)
                            *(["--native"] if a.native else ["--nonblocking"])],
                           log_to=out_dir / "py-spy.log")
        time.sleep(1.5)  # py-spy attaches
        rec = load.measure(mh.port, lambda: common.tree_cpu(mh.pid), size=SIZES[a.scenario],
                           sessions=10, count=a.count,
                           rcpt=peers.LOCAL_RCPT if a.scenario in LOCAL else "rcpt@bench.test",
                           drained=(lambda: mh.queue_count() == 0)
                           if sink or a.scenario in LOCAL else None,
                           client=tls_bench.client_argv(
                               mh.port, a.count, TLS[a.scenario], "rcpt@bench.test",
                               out_dir / "client-report.json") if a.scenario in TLS else None)
        spy.send_signal(signal.SIGINT)  # like Ctrl-C: py-spy writes its output and exits
        spy.wait(timeout=60)
        common.stop(spy)
        mh.stop()
    finally:
        common.stop_all()
    common.log(f"{a.scenario}: {rec.get('e2e_msgs_per_s', rec['msgs_per_s'])} msg/s, "
               f"{rec['server_cpu_ms_per_msg']} ms CPU/msg (under py-spy)")
    stacks: dict[str, int] = {}
    for line in raw.read_text().splitlines() if raw.exists() else []:
        stack, _, count = line.rpartition(" ")
        if count.isdigit():
            # drop the thread-name root so a function shows once however many threads ran it
            stacks[stack.split(";", 1)[-1]] = stacks.get(stack.split(";", 1)[-1], 0) + int(count)
    for line in top(stacks, a.top):
        common.log(line)
    common.log(f"\nraw stacks: {raw.relative_to(common.ROOT)}")
    return 0 if stacks else 1


if __name__ == "__main__":
    sys.exit(main())
