"""Target 6: POP3 RETR of a 10 MiB message must stream (server RSS growth <= 16 MiB).

Setup: a mailhaven with a POP3 listener on loopback (plaintext USER/PASS is allowed from
loopback), a mailbox user `bench` created with `mailhaven user -c CONFIG add bench` (password on
stdin), and one 10 MiB message delivered to bench@localhost through SMTP. Each repetition
restarts the server (so memory freed by the previous RETR does not hide the next one's
peak), logs in with poplib (the login's own peak is reported apart: argon2id), resets VmHWM,
RETRs the message and reads VmHWM. No peer: no other POP3 server is installed here.
"""

from __future__ import annotations

import poplib
import time
from collections.abc import Callable
from typing import Any

import common
import load
import peers
from memory import reset_tree_hwm, tree_kib
from report import Goal, Metric

USER, PASSWORD = "bench", "bench-password"
SIZE = 10 * 2**20


def setup(mh: peers.Mailhaven) -> None:
    common.fresh_dir(mh.dir)
    mh.write_config()
    common.run([str(peers.MAILHAVEN), "user", "-c", str(mh.config), "add", USER],
               input=PASSWORD + "\n")
    mh.start()
    rec = load.measure(mh.port, lambda: 0.0, size=SIZE, sessions=1, count=1,
                       rcpt=f"{USER}@localhost", drained=lambda: mh.queue_count() == 0)
    new = mh.state / "mail" / "localhost" / USER / "new"  # <mail root>/<domain>/<user>
    if not rec["ok"] or not new.is_dir() or not any(new.iterdir()):
        raise RuntimeError(f"10 MiB message not delivered to {new}: {rec}")


def retr_once(mh: peers.Mailhaven) -> dict[str, Any]:
    """One session. VmHWM is reset again after the login: verifying the argon2id password
    briefly takes its memory cost (64 MiB by default), which is not RETR's doing."""
    mh.stop()
    mh.start()
    assert mh.pop3_port is not None
    time.sleep(1.0)
    before = tree_kib(mh.pid, "VmRSS")
    reset_tree_hwm(mh.pid)
    pop = poplib.POP3(common.HOST, mh.pop3_port, timeout=60)
    try:
        pop.user(USER)
        pop.pass_(PASSWORD)
        login_peak = tree_kib(mh.pid, "VmHWM")
        before_retr = tree_kib(mh.pid, "VmRSS")
        reset_tree_hwm(mh.pid)
        t0 = time.perf_counter()
        _, lines, octets = pop.retr(1)
        took = time.perf_counter() - t0
        peak = tree_kib(mh.pid, "VmHWM")
    finally:
        pop.quit()
    return {"octets": octets, "lines": len(lines), "seconds": round(took, 3),
            "rss_before_kib": before, "login_hwm_kib": login_peak,
            "login_growth_mib": round((login_peak - before) / 1024, 2),
            "rss_before_retr_kib": before_retr, "hwm_after_retr_kib": peak,
            "growth_mib": round((peak - before_retr) / 1024, 2), "ok": octets >= SIZE}


def run(reps: int, record: Callable[..., None]) -> list[Metric]:
    mh = peers.Mailhaven("pop3-mailhaven", "hold", pop3_port=common.free_port())
    metric = Metric("6. POP3 RETR of a 10 MiB message", "RSS growth during RETR", "MiB",
                    "mailhaven", [Goal("<=", 16.0)])
    login = Metric(metric.target, "RSS growth during USER/PASS (argon2id)", "MiB", "mailhaven")
    speed = Metric(metric.target, "RETR rate", "MiB/s", "mailhaven")
    try:
        setup(mh)
        for rep in range(reps):
            rec = retr_once(mh)
            record("run", scenario=metric.target, system="mailhaven", rep=rep, **rec)
            common.log(f"  mailhaven        rep {rep}: RETR +{rec['growth_mib']} MiB, "
                       f"{rec['octets']} octets in {rec['seconds']}s; "
                       f"login +{rec['login_growth_mib']} MiB")
            if rec["ok"]:
                metric.add("mailhaven", rec["growth_mib"])
                login.add("mailhaven", rec["login_growth_mib"])
                speed.add("mailhaven", round(SIZE / 2**20 / rec["seconds"], 1))
    finally:
        mh.stop()
    return [metric, login, speed]
