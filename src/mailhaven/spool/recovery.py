"""Start-up recovery: make the spool directory agree with the database, never fatally.

Runs once at `Spool.open()`, inside the writer thread, before any other job. What it trusts: a
committed row (the COMMIT returned, so it was acknowledged or about to be). What it does not:
files, which a crash or an operator may have left half-written, missing or truncated.

- `tmp/*`: bodies still being received or not yet linked; never acknowledged: deleted.
- `bodies/<qid>` without a row: linked but the commit never happened: deleted.
- a row whose body file is missing, unreadable or of the wrong size: the message is quarantined
  (file moved to `quarantine/`, row flagged, recipients held with `Hold.QUARANTINE`) and logged;
  the rest of the queue carries on.
- recipients marked `active` (an attempt was in flight at the crash) become attemptable again:
  delivery is at-least-once.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path

from mailhaven.spool.ids import is_queue_id
from mailhaven.spool.records import Hold

log = logging.getLogger("mailhaven.spool")


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    messages: int
    discarded_temp: int
    discarded_orphans: int
    quarantined: tuple[str, ...]
    reactivated: int


def recover(conn: sqlite3.Connection, tmp: Path, bodies: Path, quarantine: Path) -> RecoveryReport:
    discarded_temp = 0
    for leftover in os.scandir(tmp):
        Path(leftover.path).unlink(missing_ok=True)
        discarded_temp += 1
    if discarded_temp:
        log.info("spool recovery: discarded %d unfinished incoming message(s)", discarded_temp)

    reactivated = conn.execute("UPDATE recipient SET active = 0 WHERE active = 1").rowcount

    on_disk = {e.name: e for e in os.scandir(bodies)}
    expected = conn.execute(
        "SELECT qid, size - length(header), quarantined FROM message WHERE body_file = 1"
    ).fetchall()
    quarantined: list[str] = []
    for qid, body_size, already in expected:
        entry = on_disk.pop(qid) if qid in on_disk else None
        if already:
            continue
        problem = _check_body(entry, body_size)
        if problem:
            _quarantine(conn, qid, entry, quarantine, problem)
            quarantined.append(qid)

    orphans = 0
    for name, orphan in on_disk.items():
        if is_queue_id(name):
            Path(orphan.path).unlink(missing_ok=True)
            orphans += 1
        else:
            log.warning("spool recovery: leaving unknown file bodies/%s alone", name)
    if orphans:
        log.info("spool recovery: discarded %d body file(s) never committed", orphans)

    (messages,) = conn.execute("SELECT count(*) FROM message").fetchone()
    return RecoveryReport(messages, discarded_temp, orphans, tuple(quarantined), reactivated)


def _check_body(entry: os.DirEntry[str] | None, body_size: int) -> str | None:
    if entry is None:
        return "body file missing"
    try:
        st = entry.stat(follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            return "body is not a regular file"
        if st.st_size < body_size:  # more is the envelope trailer (salvage.py)
            return f"body size {st.st_size} != {body_size} committed"
        with open(entry.path, "rb") as f:
            f.read(1)
    except OSError as exc:
        return f"body unreadable: {exc.strerror or exc}"
    return None


def _quarantine(
    conn: sqlite3.Connection,
    qid: str,
    entry: os.DirEntry[str] | None,
    quarantine: Path,
    problem: str,
) -> None:
    log.warning("%s: quarantined: %s", qid, problem)
    if entry is not None:
        try:
            os.rename(entry.path, quarantine / qid)
        except OSError as exc:
            log.error("%s: cannot move body to quarantine: %s", qid, exc)
    conn.execute("UPDATE message SET quarantined = 1 WHERE qid = ?", (qid,))
    conn.execute(
        "UPDATE recipient SET hold = hold | ? WHERE qid = ?", (int(Hold.QUARANTINE), qid)
    )
