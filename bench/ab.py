"""mailhaven against itself: two variants, alternating in one invocation, and their ratio.

    .venv/bin/python bench/ab.py relay --b-set smtp_processes=2     # what a second process buys
    .venv/bin/python bench/ab.py relay --a-rev 74cb3d4              # an older commit vs this tree
    .venv/bin/python bench/ab.py relay --a-set 'log_level="warning"'  # what the maillog costs
    .venv/bin/python bench/ab.py hold --count 6000 --reps 4         # acceptance only
    .venv/bin/python bench/ab.py local --count 2000                 # delivery into a Maildir
    .venv/bin/python bench/ab.py hold --size 102400 --count 2000    # 100 KiB messages
    .venv/bin/python bench/ab.py hold --tls --count 2000 [--resume]  # STARTTLS every message

A variant is this working tree (default) or a git revision (`--a-rev`, `--b-rev`: checked out
as a worktree under bench/tmp and put first on the server's PYTHONPATH), plus settings
(`--a-set`, `--b-set`: TABLE.KEY=TOML, repeatable, as run.py's --set). Why a separate command:
run.py compares mailhaven with Postfix, and two such runs happen minutes apart while this
machine's speed drifts within minutes; here both variants alternate against the same
smtp-sink, so their ratio is the change's effect. Prints one line per run and the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import common
import load
import peers
import tls_bench


@dataclass
class Variant:
    name: str
    rev: str | None
    settings: dict[str, dict[str, object]]
    tree: Path | None = None
    rates: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)

    def label(self) -> str:
        sets = [f"{t + '.' if t else ''}{k}={v!r}" for t, kv in self.settings.items()
                for k, v in kv.items()]
        where = self.rev or (str(self.tree) if self.tree else "working tree")
        return " ".join([where, *sets])

    def env(self) -> dict[str, str] | None:
        if self.tree is None:
            return None
        return dict(os.environ, PYTHONPATH=str(self.tree / "src"))


def variant(name: str, rev: str | None, items: list[str]) -> Variant:
    settings: dict[str, dict[str, object]] = {}
    for item in items:
        table, key, value = common.setting(item)
        settings.setdefault(table, {})[key] = value
    return Variant(name, rev, settings)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["relay", "hold", "local"])
    ap.add_argument("--count", type=int, default=4000)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024, help="message size in bytes (smtp-source)")
    ap.add_argument("--tls", action="store_true",
                    help="STARTTLS on every connection (tls_bench.py's client and certificate)")
    ap.add_argument("--resume", action="store_true", help="with --tls: resume TLS sessions")
    for side in ("a", "b"):
        ap.add_argument(f"--{side}-rev", help="a git revision instead of this working tree")
        ap.add_argument(f"--{side}-tree", type=Path,
                        help="a prepared source tree instead (e.g. one built with mypyc)")
        ap.add_argument(f"--{side}-set", action="append", default=[], metavar="TABLE.KEY=TOML")
    a = ap.parse_args()
    sides = [variant("a", a.a_rev, a.a_set), variant("b", a.b_rev, a.b_set)]
    common.prepare_disk()
    if a.tls:
        cert, key = tls_bench.make_cert("ec", common.TMP / "ab-certs")
        for v in sides:
            v.settings.setdefault("tls", {}).update(cert=str(cert), key=str(key))
    for v, tree in zip(sides, (a.a_tree, a.b_tree), strict=True):
        v.tree = tree.resolve() if tree is not None else None
    sink = peers.SmtpSink("ab-sink")
    sink.start()
    try:
        for v in sides:
            if v.rev is not None:
                v.tree = common.fresh_dir(common.TMP / f"ab-tree-{v.name}")
                v.tree.rmdir()
                common.run(["git", "-C", str(common.ROOT), "worktree", "add", "--detach",
                            str(v.tree), v.rev])
            common.log(f"{v.name}: {v.label()}")
        for rep in range(a.reps):
            for v in sides if rep % 2 == 0 else sides[::-1]:
                mh = peers.Mailhaven(f"ab-{v.name}", a.mode, sink_port=sink.port,
                                     extra=v.settings, env=v.env())
                common.fresh_dir(mh.dir)
                mh.start()
                time.sleep(1.0)  # a worker process starts after the daemon's greeting
                load.wait_quiet()
                rec = load.measure(
                    mh.port, lambda mh=mh: common.tree_cpu(mh.pid), size=a.size, sessions=10,
                    count=a.count,
                    drained=(lambda mh=mh: mh.queue_count() == 0) if a.mode != "hold" else None,
                    rcpt=peers.LOCAL_RCPT if a.mode == "local" else "rcpt@bench.test",
                    client=tls_bench.client_argv(
                        mh.port, a.count, a.resume,
                        peers.LOCAL_RCPT if a.mode == "local" else "rcpt@bench.test",
                        common.TMP / "ab-client-report.json") if a.tls else None,
                )
                mh.stop()
                rate = rec.get("e2e_msgs_per_s", rec["msgs_per_s"])
                common.log(f"{v.name} rep {rep}: {rate:8.1f} msg/s, "
                           f"cpu {rec['server_cpu_ms_per_msg']:.2f} ms/msg, "
                           f"machine {rec['machine_busy_pct']:.0f}% busy")
                if rec["ok"]:
                    v.rates.append(rate)
                    v.cpus.append(rec["server_cpu_ms_per_msg"])
    finally:
        sink.stop()
        common.stop_all()
        for v in sides:
            if v.tree is not None and v.rev is not None:
                common.run(["git", "-C", str(common.ROOT), "worktree", "remove", "--force",
                            str(v.tree)], check=False)
    med = {v.name: statistics.median(v.rates) if v.rates else 0.0 for v in sides}
    for v in sides:
        cpu = statistics.median(v.cpus) if v.cpus else float("nan")
        common.log(f"{v.name} ({v.label()}): median {med[v.name]:.0f} msg/s, {cpu:.2f} ms CPU/msg")
    common.log(f"ratio b/a {med['b'] / med['a'] if med['a'] else float('nan'):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
