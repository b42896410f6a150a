"""`mailhaven queue salvage [--force]`: check each queue shard's `queue.db` and rebuild a
damaged one from the spool files (Postfix's `postsuper -s`; see `spool.salvage`).

The daemon does the same by itself at start-up; this is for an operator who wants to check or
rebuild with the daemon stopped (it takes each shard's queue lock, so it refuses to run beside
a daemon). `--force` rebuilds even a database that passes the check. Exit status: 0 done,
1 the queue is locked or a rebuild failed.
"""

from __future__ import annotations

from typing import TextIO

from mailhaven.config import Config
from mailhaven.spool.lock import DaemonLock, lock_path
from mailhaven.spool.salvage import check, salvage
from mailhaven.spool.shards import existing_shards


def run(config: Config, *, force: bool, out: TextIO, err: TextIO) -> int:
    for root in existing_shards(config.spool_path):
        if not root.is_dir():
            continue
        lock = DaemonLock.acquire(lock_path(root))
        if lock is None:
            print(f"mailhaven queue: {root} is locked (is the daemon running?); stop it first",
                  file=err)
            return 1
        with lock:
            problem = check(root / "queue.db")
            if problem is None and not force:
                print(f"{root}: queue.db is sound", file=out)
                continue
            if problem is not None:
                print(f"{root}: queue.db is damaged: {problem}", file=out)
            try:
                report = salvage(root)
            except OSError as exc:
                print(f"mailhaven queue: salvage of {root} failed: {exc}", file=err)
                return 1
            print(
                f"{root}: queue rebuilt: {report.from_rows} message(s) from database rows,"
                f" {report.from_files} from body files, {report.unrecoverable} body"
                f" file(s) without an envelope moved to quarantine/; old database kept in"
                f" {report.moved_to}",
                file=out,
            )
    return 0
