"""What a Maildir copy costs the kernel: the copy as `mailbox.maildir.deliver` makes it, unnamed
(`O_TMPFILE`, linked into `new/`) against named (created in `tmp/`, renamed into `new/`).

    .venv/bin/python bench/maildir_files.py [--files 4000] [--threads 4] [--size 1024] [--reps 3]

Each run delivers `--files` messages from `--threads` threads (the direct door's copy threads
are four) into one fresh Maildir under bench/tmp, both ways alternating, and prints files per
second and the process's user and system CPU per file. No SMTP, no server: the file system's
share of a local delivery, which docs/benchmarks.md quotes.
"""

from __future__ import annotations

import argparse
import resource
import sys
import threading
import time

import common

from mailhaven.mailbox import maildir


def run(unnamed: bool, files: int, workers: int, size: int) -> tuple[float, float, float]:
    """(files per second, user µs per file, system µs per file)"""
    box = common.fresh_dir(common.TMP / "maildir-files") / "box"
    maildir.ensure_maildir(box)
    maildir._unnamed.usable = unnamed  # the switch `deliver` reads (it falls back by itself)
    names = maildir.UniqueNames("bench.test")
    body = b"Subject: x\r\n\r\n" + b"y" * max(0, size - 16) + b"\r\n"

    def work(n: int) -> None:
        for _ in range(n):
            maildir.deliver(box, body, names=names, no_bare_cr=True)

    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    pool = [threading.Thread(target=work, args=(files // workers,)) for _ in range(workers)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    done = files // workers * workers
    return (done / wall, 1e6 * (after.ru_utime - before.ru_utime) / done,
            1e6 * (after.ru_stime - before.ru_stime) / done)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    if not maildir._unnamed.usable:
        raise SystemExit("no O_TMPFILE here: only the named path exists")
    common.prepare_disk()
    try:
        for rep in range(a.reps):
            for unnamed in (False, True):
                rate, user, system = run(unnamed, a.files, a.threads, a.size)
                common.log(f"rep {rep} {'unnamed' if unnamed else 'named':<8} {rate:7.0f} "
                           f"files/s, user {user:4.0f} µs, system {system:4.0f} µs per file")
    finally:
        common.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
