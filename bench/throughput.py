"""Targets 1-3 and 7: durable acceptance (1 KiB, 100 KiB, 10 MiB), relay end to end (1 KiB),
local delivery end to end into a Maildir (1 KiB, 100 KiB).

Each repetition runs every system once, in an order rotated per repetition (so no system is
always first after the pause), and each run starts from an empty queue: mailhaven is
restarted on a fresh state directory, Postfix's queue is emptied with `postsuper -d ALL`,
aiosmtpd's spool directories are recreated. A run counts only if smtp-source exited 0 and
the server holds exactly the messages sent (accept-only), or its queue drained (relay), or its
queue drained and the Maildir's `new/` holds exactly the messages sent (local delivery).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import common
import load
import peers
from report import Goal, Metric


@dataclass
class System:
    """What a scenario needs from a server under test, as plain callables."""

    name: str
    port: Callable[[], int]
    cpu: Callable[[], float]
    reset: Callable[[], None]
    stored: Callable[[], int] | None = None  # messages on disk after the run (queue or Maildir)
    drained: Callable[[], bool] | None = None  # end to end: queue empty
    rcpt: str = "rcpt@bench.test"


def mailhaven(mh: peers.Mailhaven) -> System:
    def reset() -> None:
        mh.stop()
        common.fresh_dir(mh.dir)
        mh.start()

    if mh.mode == "local":
        return System(mh.name, lambda: mh.port, lambda: common.tree_cpu(mh.pid), reset,
                      stored=lambda: common.maildir_count(mh.state / "mail"),
                      drained=lambda: mh.queue_count() == 0, rcpt=peers.LOCAL_RCPT)
    return System(mh.name, lambda: mh.port, lambda: common.tree_cpu(mh.pid), reset,
                  stored=mh.queue_count if mh.mode == "hold" else None,
                  drained=(lambda: mh.recipient_count("pending") == 0 and mh.queue_count() == 0)
                  if mh.mode == "relay" else None)


def postfix_hold(pf: peers.Postfix) -> System:
    return System("postfix-hold", lambda: pf.hold_port, lambda: common.tree_cpu(pf.master_pid()),
                  pf.clear_queue, stored=pf.qsize)


def postfix_relay(pf: peers.Postfix) -> System:
    return System("postfix-relay", lambda: pf.relay_port,
                  lambda: common.tree_cpu(pf.master_pid()), pf.clear_queue,
                  drained=lambda: pf.qsize() == 0)


def postfix_local(pf: peers.Postfix) -> System:
    """Postfix's virtual(8) delivering into one Maildir (no mailbox size limit)."""

    def reset() -> None:
        pf.clear_queue()
        pf.clear_maildirs()

    return System("postfix-local", lambda: pf.relay_port,
                  lambda: common.tree_cpu(pf.master_pid()), reset,
                  stored=lambda: common.maildir_count(pf.vmail),
                  drained=lambda: pf.qsize() == 0, rcpt=peers.POSTFIX_LOCAL_RCPT)


def aiosmtpd(aio: peers.Aiosmtpd) -> System:
    return System(aio.name, lambda: aio.port, lambda: common.proc_cpu(aio.pid), aio.clear,
                  stored=aio.stored)


@dataclass
class Scenario:
    target: str
    size: int
    sessions: int
    count: int
    goals: list[Goal]
    e2e: bool = False


def scenarios(full: bool) -> dict[str, Scenario]:
    """Message counts: runs of about 1-4 s (quick) or 3-10 s (full) on this machine."""
    pick = (lambda q, f: f) if full else (lambda q, f: q)
    return {
        "accept_1k": Scenario("1. durable acceptance 1 KiB, s=10", 1024, 10, pick(2000, 6000),
                              [Goal("ratio>=", 2.0, "postfix-hold")]),
        "relay_1k": Scenario("2. relay end to end 1 KiB, s=10", 1024, 10, pick(2000, 5000),
                             [Goal("ratio>=", 2.0, "postfix-relay")], e2e=True),
        "local_1k": Scenario("7a. local delivery into Maildir 1 KiB, s=10", 1024, 10,
                             pick(2000, 5000), [Goal("ratio>=", 2.0, "postfix-local")], e2e=True),
        "local_100k": Scenario("7b. local delivery into Maildir 100 KiB, s=10", 102400, 10,
                               pick(400, 1500), [Goal("ratio>=", 1.5, "postfix-local")],
                               e2e=True),
        "accept_100k": Scenario("3a. durable acceptance 100 KiB, s=10", 102400, 10,
                                pick(600, 2000), [Goal("ratio>=", 1.0, "postfix-hold")]),
        "accept_10m": Scenario("3b. durable acceptance 10 MiB, s=1", 10 * 2**20, 1,
                               pick(8, 20), [Goal("ratio>=", 1.0, "postfix-hold")]),
    }


def run(sc: Scenario, systems: list[System], reps: int, pause: float,
        record: Callable[..., None]) -> list[Metric]:
    """Alternate the systems `reps` times; returns the rate metric and the CPU metric."""
    ours = systems[0].name
    rate = Metric(sc.target, "end to end (queue empty)" if sc.e2e else "accepted", "msg/s",
                  ours, sc.goals)
    cpu = Metric(sc.target, "server CPU per message", "ms", ours)
    for rep in range(reps):
        k = rep % len(systems)
        for system in systems[k:] + systems[:k]:
            system.reset()
            common.settle(pause)
            quiet = load.wait_quiet()
            rec = load.measure(system.port(), system.cpu, size=sc.size, sessions=sc.sessions,
                               count=sc.count, drained=system.drained, rcpt=system.rcpt,
                               timeout=max(120.0, sc.count * sc.size / 2**20))
            check(rec, system)
            record("run", scenario=sc.target, system=system.name, rep=rep,
                   busy_before_pct=quiet, **rec)
            value = rec["e2e_msgs_per_s"] if sc.e2e else rec["msgs_per_s"]
            common.log(f"  {system.name:<16} rep {rep}: {value:>9.1f} msg/s  "
                       f"cpu {rec['server_cpu_ms_per_msg']:.2f} ms/msg, "
                       f"others {rec['others_busy_pct']:.0f}% busy"
                       + ("" if rec["ok"] else f"  NOT OK: {rec.get('problem', rec)}"))
            if rec["ok"]:
                rate.add(system.name, value)
                cpu.add(system.name, rec["server_cpu_ms_per_msg"])
    return [rate, cpu]


def check(rec: dict[str, Any], system: System) -> None:
    """The server must hold every message it said 250 to (in its queue, accept-only; in the
    Maildir, local delivery)."""
    if system.stored is not None:
        rec["stored"] = system.stored()
        if rec["stored"] != rec["count"]:
            rec["ok"] = False
            rec["problem"] = f"stored {rec['stored']} of {rec['count']}"
