"""The benchmark suite: mailhaven against its peers, side by side, in one invocation.

    .venv/bin/python bench/run.py quick      # about 5 minutes (3 without accept_tls_1k)
    .venv/bin/python bench/run.py full       # about 15 minutes
    .venv/bin/python bench/run.py quick --only accept_1k relay_1k --reps 5

Sets up the peers on 127.0.0.1 (a separate Postfix instance under bench/tmp/postfix, the
aiosmtpd durable peer, smtp-sink), runs every target of issue 6 with mailhaven and the peers
alternating, and prints medians, min-max and the ratio mailhaven/peer per target, with the
goal and whether it is met. Results: bench/results/<mode>-<UTC time>.jsonl (one line per run,
then the summaries). docs/benchmarks.md explains every scenario and holds the latest numbers.

Why one process orchestrates everything: each server it starts is stopped by its PID at the
end, also on Ctrl-C or SIGTERM (atexit + signal handler); Postfix is stopped with
`postfix -c <our config dir> stop`. The last line says whether anything was left running.
"""

from __future__ import annotations

import argparse
import atexit
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import common
import memory
import peers
import pop3_retr
import queue_scale
import report
import throughput
import tls_bench

THROUGHPUT = ("accept_1k", "relay_1k", "local_1k", "local_100k", "accept_100k", "accept_10m")
ALL = (*THROUGHPUT, "accept_tls_1k", "memory", "queue", "pop3")


def versions() -> dict[str, str]:
    def out(argv: list[str]) -> str:
        r = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=common.ROOT)
        return r.stdout.strip()

    dirty = out(["git", "status", "--porcelain", "--", "src"])
    return {
        "mailhaven": out(["git", "rev-parse", "--short", "HEAD"])
        + (f" + uncommitted changes in {len(dirty.splitlines())} src files" if dirty else ""),
        "python": out([str(common.VENV_PY), "-c", "import sys; print(sys.version.split()[0])"]),
        "aiosmtpd": out([str(common.VENV_PY), "-c",
                         "import aiosmtpd; print(aiosmtpd.__version__)"]),
        "postfix": peers.postfix_version() if peers.postfix_available() else "not installed",
        "kernel": platform.release(),
        "cpus": str(os.cpu_count()),
        "cpu": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                     if ln.startswith("model name")), "?"),
    }


def install_postfix(attempts: int = 20, wait: float = 15.0) -> None:
    """Another session may hold the apt lock: retry, bounded."""
    for i in range(attempts):
        try:
            peers.install_postfix()
            return
        except subprocess.CalledProcessError as exc:
            common.log(f"postfix install failed ({exc}); apt busy? retry {i + 1}/{attempts}")
            time.sleep(wait)
    raise SystemExit("could not install postfix")


class Peers:
    """The long-running peers of the throughput targets; `close()` stops them all."""

    def __init__(self) -> None:
        install_postfix()
        self.sink = peers.SmtpSink("relay-sink")
        self.sink.start()
        self.postfix = peers.Postfix(self.sink.port)
        self.postfix.setup()
        self.postfix.start()
        self.aio = peers.Aiosmtpd(common.VENV_PY)
        self.aio.start()
        self.hold = peers.Mailhaven("mailhaven-hold", "hold")
        self.relay = peers.Mailhaven("mailhaven-relay", "relay", sink_port=self.sink.port)
        self.local = peers.Mailhaven("mailhaven-local", "local")

    def systems(self, name: str) -> list[throughput.System]:
        if name == "relay_1k":
            return [throughput.mailhaven(self.relay), throughput.postfix_relay(self.postfix)]
        if name.startswith("local_"):
            return [throughput.mailhaven(self.local), throughput.postfix_local(self.postfix)]
        return [throughput.mailhaven(self.hold), throughput.postfix_hold(self.postfix),
                throughput.aiosmtpd(self.aio)]

    def close(self) -> None:
        for mh in (self.hold, self.relay, self.local):
            mh.stop()
        self.aio.stop()
        self.postfix.stop()
        self.sink.stop()


def leftovers(pf_pid: int | None) -> list[int]:
    pids = common.descendants(os.getpid())
    if pf_pid and os.path.exists(f"/proc/{pf_pid}"):
        pids.append(pf_pid)
    return pids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["quick", "full"])
    ap.add_argument("--only", nargs="+", choices=ALL, default=list(ALL), metavar="TARGET",
                    help=f"a subset of: {' '.join(ALL)}")
    ap.add_argument("--reps", type=int, help="repetitions (default: quick 3/2, full 5/3)")
    ap.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=TOML",
                    help="a mailhaven setting for every instance, e.g. --set "
                         "'limits.connections=30000' (a key without a table: top level)")
    a = ap.parse_args()
    for item in a.set:
        table, name, value = common.setting(item)
        peers.Mailhaven.overrides.setdefault(table, {})[name] = value
    full = a.mode == "full"
    reps_tp = a.reps or (5 if full else 3)
    reps_other = a.reps or (3 if full else 2)
    nofile = common.raise_nofile(20000)
    common.prepare_disk()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    rec = report.Recorder(f"{a.mode}-{stamp}")
    meta = {"command": " ".join([".venv/bin/python", "bench/run.py", *sys.argv[1:]]),
            "date": stamp, "nofile": nofile, "mailhaven_set": a.set, **versions()}
    rec.write("meta", **meta)
    for k, v in meta.items():
        common.log(f"{k}: {v}")
    held: dict[str, Any] = {}
    atexit.register(common.stop_all)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.perf_counter()
    metrics: list[report.Metric] = []
    record: Callable[..., None] = rec.write

    def failed(title: str, exc: BaseException) -> None:
        common.log(f"  FAILED: {exc}")
        rec.write("error", scenario=title, error=repr(exc))
        if "peers" in held:  # a mailhaven left half-started by the failure
            held["peers"].hold.stop()
            held["peers"].relay.stop()
            held["peers"].local.stop()
        held.setdefault("failed", []).append(title)
    try:
        todo = [t for t in ALL if t in a.only]
        if any(t in THROUGHPUT for t in todo):
            held["peers"] = p = Peers()
            held["pf_pid"] = p.postfix.master_pid()
            for name, sc in throughput.scenarios(full).items():
                if name in todo:
                    common.log(f"== {sc.target} ({sc.count} msgs x {reps_tp} reps)")
                    try:  # one broken scenario must not cost the others' numbers
                        metrics += throughput.run(sc, p.systems(name), reps_tp, 0.5, record)
                    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                        failed(sc.target, exc)
            p.close()
            del held["peers"]
        others: list[tuple[str, str, Callable[[], list[report.Metric]]]] = [
            # its own peers (Postfix with TLS, the TLS sink) and load client: tls_bench.py
            ("accept_tls_1k", "8. STARTTLS acceptance",
             lambda: tls_bench.run(full, a.reps or 3, record, ("ec", "rsa") if full else ("ec",))),
            ("memory", "4. memory", lambda: memory.run(full, reps_other, record)),
            ("queue", "5. queue scale", lambda: queue_scale.run(full, reps_other, record)),
            ("pop3", "6. POP3 RETR", lambda: pop3_retr.run(reps_other, record)),
        ]
        for name, title, scenario in others:
            if name in todo:
                common.log(f"== {title}")
                try:
                    metrics += scenario()
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    failed(title, exc)
    finally:
        if "peers" in held:
            held["peers"].close()
        common.stop_all()
        rec.summary(metrics)
        path = rec.close()
    lines = report.table(metrics)
    common.log(f"\n## Results ({a.mode}, {stamp}, {time.perf_counter() - t_start:.0f} s)\n")
    for line in lines:
        common.log(line)
    left = leftovers(held.get("pf_pid"))
    common.log(f"\nresults: {path.relative_to(common.ROOT)}")
    common.log(f"left running: {left or 'nothing'}")
    if held.get("failed"):
        common.log(f"FAILED scenarios: {', '.join(held['failed'])}")
    return 1 if left or held.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
