"""Target 5: a spool with many deferred messages: restart recovery, `queue list`, delivery cost.

Two mailhaven instances with the same relay config: "mailhaven-100k" (or -20k in quick mode)
is filled with messages to `deferred.test`, whose transport points at a loopback port nobody
listens on, so each is tried once and deferred (backoff raised to an hour so none comes due
again during the run); "mailhaven-empty" keeps an empty queue. Then:

- recovery: stop the full instance, start it, seconds until the SMTP greeting;
- `mailhaven queue -c CONFIG list` wall time (output thrown away);
- cost per delivery: both instances, alternately, accept 1,000 fresh 1 KiB messages for
  bench.test and relay them to a loopback smtp-sink; server CPU ms per delivered message and
  end-to-end rate, full queue vs empty. "Independent of queue size" is read as a ratio <= 1.25
  (the noise between runs here is ~15 %).
- for comparison only, the same number of deferred messages in a separate Postfix instance:
  restart until its greeting and `postqueue -p`.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import common
import load
import peers
from report import Goal, Metric


def make(name: str, sink_port: int, closed_port: int) -> peers.Mailhaven:
    return peers.Mailhaven(name, "relay", sink_port=sink_port, extra={
        "relay": {"transport": {"deferred.test": f"[{common.HOST}]:{closed_port}"}},
        "queue": {"minimal_backoff": 3600.0, "maximal_backoff": 4000.0},
    })


def fill(mh: peers.Mailhaven, total: int, record: Callable[..., None]) -> None:
    """Bounded: chunks of at most 10,000 messages, then wait until none is pending."""
    t0 = time.perf_counter()
    sent = 0
    while sent < total:
        n = min(10_000, total - sent)
        rec = load.measure(mh.port, lambda: common.tree_cpu(mh.pid), size=1024, sessions=10,
                           count=n, rcpt="rcpt@deferred.test", timeout=600)
        if not rec["ok"]:
            raise RuntimeError(f"filling the queue failed: {rec}")
        sent += n
    deadline = time.monotonic() + 600
    while mh.recipient_count("pending") and time.monotonic() < deadline:
        time.sleep(0.2)
    deferred = mh.recipient_count("deferred")
    took = time.perf_counter() - t0
    record("fill", system=mh.name, sent=sent, deferred=deferred, seconds=round(took, 2))
    common.log(f"  filled {mh.name}: {deferred} deferred of {sent} in {took:.1f}s "
               f"({sent / took:.0f} msg/s incl. the failed attempts)")
    if deferred != total:
        raise RuntimeError(f"{mh.name}: {deferred} deferred, expected {total}")


def delivery_once(mh: peers.Mailhaven, count: int, baseline: int) -> dict[str, Any]:
    def drained() -> bool:  # the cheap index range scan first, the full count once at the end
        return mh.recipient_count("pending") == 0 and mh.recipient_count() == baseline

    return load.measure(mh.port, lambda: common.tree_cpu(mh.pid), size=1024, sessions=10,
                        count=count, drained=drained, timeout=300)


def run(full: bool, reps: int, record: Callable[..., None]) -> list[Metric]:
    total = 100_000 if full else 20_000
    label = f"{total // 1000}k"
    sink = peers.SmtpSink("queue-sink")
    sink.start()
    closed = common.free_port()
    big, empty = make(f"mailhaven-{label}", sink.port, closed), make("mailhaven-empty",
                                                                      sink.port, closed)
    for mh in (big, empty):
        common.fresh_dir(mh.dir)
        mh.start()
    t = f"5. queue scale, {label} deferred"
    recovery = Metric(t, "restart until greeting", "s", big.name, [Goal("<=", 10.0)])
    listing = Metric(t, "`mailhaven queue list` (Postfix: `postqueue -p`)", "s", big.name,
                     [Goal("<=", 5.0)])
    cost = Metric(t, "server CPU per delivery", "ms", big.name,
                  [Goal("ratio<=", 1.25, empty.name)])
    rate = Metric(t, "delivery end to end", "msg/s", big.name)
    try:
        fill(big, total, record)
        for rep in range(reps):
            for mh in (big, empty):
                mh.stop()
                took = mh.start()
                recovery.add(mh.name, round(took, 3))
                record("run", scenario=recovery.name, system=mh.name, rep=rep, seconds=took)
                t0 = time.perf_counter()
                out = common.run([str(peers.MAILHAVEN), "queue", "-c", str(mh.config), "list"],
                                 timeout=600, check=False)
                took_list = time.perf_counter() - t0
                listing.add(mh.name, round(took_list, 3))
                record("run", scenario=listing.name, system=mh.name, rep=rep,
                       seconds=took_list, rc=out.returncode, tail=out.stdout[-80:])
                common.log(f"  {mh.name:<16} rep {rep}: restart {took:.2f}s, "
                           f"queue list {took_list:.2f}s (rc {out.returncode})")
        for rep in range(reps):
            for mh, baseline in ((big, total), (empty, 0)) if rep % 2 == 0 else \
                    ((empty, 0), (big, total)):
                common.settle(0.5)
                load.wait_quiet()
                rec = delivery_once(mh, 1000, baseline)
                record("run", scenario=cost.target + " delivery", system=mh.name, rep=rep, **rec)
                common.log(f"  {mh.name:<16} rep {rep}: {rec['e2e_msgs_per_s']:.0f} msg/s, "
                           f"{rec['server_cpu_ms_per_msg']:.2f} ms/delivery"
                           + ("" if rec["ok"] else "  NOT OK"))
                if rec["ok"]:
                    cost.add(mh.name, rec["server_cpu_ms_per_msg"])
                    rate.add(mh.name, rec["e2e_msgs_per_s"])
        postfix_side(sink.port, total, reps, recovery, listing, record)
    finally:
        for mh in (big, empty):
            mh.stop()
            shutil.rmtree(mh.dir, ignore_errors=True)  # the full spool is ~1.5 KiB a message
        sink.stop()
    return [recovery, listing, cost, rate]


def postfix_side(sink_port: int, total: int, reps: int, recovery: Metric, listing: Metric,
                 record: Callable[..., None]) -> None:
    """The same queue in Postfix, for comparison only: restart and `postqueue -p`."""
    pf = peers.Postfix(sink_port)
    name = f"postfix-{total // 1000}k"
    pf.setup({"minimal_backoff_time": "3600s", "maximal_backoff_time": "4000s",
              "queue_run_delay": "3600s"})
    pf.start()
    try:
        t0 = time.perf_counter()
        for sent in range(0, total, 10_000):
            rec = load.measure(pf.relay_port, lambda: 0.0, size=1024, sessions=10,
                               count=min(10_000, total - sent), rcpt="rcpt@deferred.test")
            if not rec["ok"]:
                raise RuntimeError(f"filling Postfix failed: {rec}")
        deferred = pf.queue / "deferred"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and \
                sum(len(f) for _, _, f in os.walk(deferred)) < total:
            time.sleep(0.5)
        common.log(f"  filled {name}: {pf.qsize()} queued in {time.perf_counter() - t0:.1f}s")
        for rep in range(reps):
            pf.stop()
            t1 = time.perf_counter()
            pf.start()
            common.wait_banner(pf.relay_port)
            took = time.perf_counter() - t1
            t2 = time.perf_counter()
            lines = pf.mailq().count("\n")
            took_list = time.perf_counter() - t2
            recovery.add(name, round(took, 3))
            listing.add(name, round(took_list, 3))
            record("run", scenario=listing.target, system=name, rep=rep, restart_s=took,
                   postqueue_s=took_list, lines=lines)
            common.log(f"  {name:<16} rep {rep}: restart {took:.2f}s, "
                       f"postqueue -p {took_list:.2f}s ({lines} lines)")
    finally:
        pf.teardown()  # stop, and remove its queue directory

