"""Queue shards: one spool per engine process when `smtp_processes` > 1.

Why shards: one Python process is one core (the GIL). With `smtp_processes = N` the daemon and
N - 1 worker processes each run the whole engine (receive, queue, schedule, deliver, bounce) on
a spool of their own, so they never wait for each other: each commits to its own SQLite file
with its own group commit and fsync (one shared SQLite file measured no gain:
docs/benchmarks.md).

Layout: shard 0 is `<state_dir>/spool` (the daemon's, and the only one with the default
`smtp_processes = 1`); shard k is `<state_dir>/spool-<k>`. Readers (`mailq`, `queue list`) merge
all shards; queue ids are unique across them (time + random counter, see `ids.py`).

Orphans: when `smtp_processes` is lowered, shards numbered N and up have no process any more.
The daemon adopts them at start-up (`adopt`), before it recovers its own spool, so no accepted
message is stranded. Adoption is crash-safe by construction: bodies are hard-linked (the orphan
keeps its own links), the rows are copied in one transaction that skips queue ids already
present, and only then is the orphan deleted; a crash anywhere means the next start does it
again with the same result.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

from mailhaven.spool.listing import list_queue
from mailhaven.spool.lock import DaemonLock, lock_path
from mailhaven.spool.message_writer import fsync_directory
from mailhaven.spool.records import MessageSummary
from mailhaven.spool.schema import connect

log = logging.getLogger("mailhaven.spool")

_PREFIX = "spool-"


def shard_path(spool_path: Path, index: int) -> Path:
    """Shard `index`'s directory (0 is `spool_path` itself)."""
    return spool_path if index == 0 else spool_path.with_name(f"{_PREFIX}{index}")


def shard_index(path: Path) -> int | None:
    """The shard number of a `spool-<k>` directory name (None: not a shard's name)."""
    digits = path.name.removeprefix(_PREFIX)
    if path.name.startswith(_PREFIX) and digits.isdigit() and not digits.startswith("0"):
        return int(digits)
    return None


def existing_shards(spool_path: Path) -> list[Path]:
    """Every shard on disk, shard 0 first, then by number."""
    found: list[tuple[int, Path]] = []
    parent = spool_path.parent
    if parent.is_dir():
        for entry in parent.iterdir():
            index = shard_index(entry)
            if index is not None and entry.is_dir():
                found.append((index, entry))
    return [spool_path, *(p for _, p in sorted(found))]


def list_all(spool_path: Path) -> Iterator[MessageSummary]:
    """`list_queue` over every shard, merged into one stream, oldest queue id first."""
    streams = [list_queue(p) for p in existing_shards(spool_path)]
    return heapq.merge(*streams, key=lambda m: m.queue_id)


def orphans(spool_path: Path, processes: int) -> list[Path]:
    """Shards that no process of a `smtp_processes = processes` daemon serves."""
    return [p for p in existing_shards(spool_path)[1:] if (shard_index(p) or 0) >= processes]


def adopt(spool_path: Path, orphan: Path) -> int:
    """Move an orphan shard's messages into shard 0 (`spool_path`); returns how many.

    The caller holds both shards' queue locks, and shard 0's writer is not running yet (this
    opens its own connection). Shard 0's recovery, which runs next, resets `active` flags and
    checks the adopted bodies like its own."""
    db = orphan / "queue.db"
    moved = 0
    spool_path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if db.exists():
        with closing(connect(spool_path / "queue.db")) as conn:
            conn.execute("ATTACH DATABASE ? AS orphan", (str(db),))
            (clashes,) = conn.execute(
                "SELECT count(*) FROM orphan.message AS o JOIN main.message AS m"
                " ON m.qid = o.qid WHERE m.arrival != o.arrival OR m.sender != o.sender"
            ).fetchone()
            if clashes:  # two different messages with one id: keep the orphan, say so
                raise RuntimeError(f"{orphan}: {clashes} queue id(s) also used in {spool_path}")
            for sub in ("bodies", "quarantine"):
                _link_all(orphan / sub, spool_path / sub)
            conn.execute("BEGIN IMMEDIATE")
            try:
                # by name: an orphan made before a column was added lacks it
                cols = ", ".join(
                    name for (name,) in conn.execute(
                        "SELECT name FROM pragma_table_info('message', 'orphan')"
                    )
                )
                moved = conn.execute(
                    f"INSERT INTO main.message ({cols}) SELECT {cols} FROM orphan.message AS o"
                    " WHERE o.qid NOT IN (SELECT qid FROM main.message)"
                ).rowcount
                conn.execute(
                    "INSERT INTO main.recipient SELECT * FROM orphan.recipient AS o"
                    " WHERE NOT EXISTS (SELECT 1 FROM main.recipient AS r"
                    " WHERE r.qid = o.qid AND r.idx = o.idx)"
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("DETACH DATABASE orphan")
    shutil.rmtree(orphan)
    fsync_directory(orphan.parent)
    log.warning("spool: adopted %d message(s) from %s (no process serves that shard now)",
                moved, orphan)
    return moved


def adopt_orphans(spool_path: Path, processes: int) -> None:
    """The daemon at start-up, before its own recovery: every orphan shard moves into shard 0
    (`spool_path`). One that is locked (a worker of an old daemon still stopping) waits for the
    next start; one that cannot be adopted is logged and left as it is."""
    for orphan in orphans(spool_path, processes):
        lock = DaemonLock.acquire(lock_path(orphan))
        if lock is None:
            log.error("spool %s is in use; not adopting it now", orphan)
            continue
        with lock:
            try:
                adopt(spool_path, orphan)
            except (OSError, RuntimeError, sqlite3.Error) as err:
                log.error("spool %s: cannot adopt it: %s", orphan, err)


def _link_all(source: Path, target: Path) -> None:
    if not source.is_dir():
        return
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    for entry in os.scandir(source):
        if entry.is_file(follow_symlinks=False):
            # FileExistsError: a previous adoption got this far before a crash
            with contextlib.suppress(FileExistsError):
                os.link(entry.path, target / entry.name)
    fsync_directory(target)
