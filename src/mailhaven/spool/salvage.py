"""Rebuilding the queue when `queue.db` is damaged (like Postfix's `postsuper -s`).

What the spool files hold: a body above the inline limit lives in `bodies/<qid>`; after its
last byte, in the same file and so the same fsync (no extra cost), an envelope record
(`trailer`: JSON with the envelope, final recipients, trace header, arrival, size and body CRC,
then `TRAILER_MAGIC` and its length). Readers stop at the body's committed size. So every big
message can be rebuilt from its file alone.
Small bodies live only inside the database (a file per message would cost an fsync per
message); they are rebuilt from whatever rows of the damaged database can still be read.

`check(db)`: SQLite's `integrity_check` (or why the file cannot even be opened); None: sound.
`salvage(root)`: move the damaged `queue.db` (and its WAL) aside to `damaged-<time>/`, create a
new one, copy every readable message row with its recipients (SQLite's `.recover` through the
`sqlite3` shell when installed, else row by row until the damage stops the read), then add the
messages known only from their body files' envelope records. Recipient states are kept where the rows were readable;
messages rebuilt from a body file start over with every recipient pending (delivery is
at-least-once: a recipient may get a second copy, no message is lost).
Run before the spool's writer starts (at `Spool.open`, or by `mailhaven queue salvage` with
the daemon stopped); start-up recovery then checks the bodies as usual.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailhaven.proto.envelope import Envelope
from mailhaven.spool import queries
from mailhaven.spool.ids import is_queue_id
from mailhaven.spool.records import Hold, QueuedRecipient
from mailhaven.spool.schema import connect

log = logging.getLogger("mailhaven.spool")

#: ends a body file's envelope record: magic, then the record's length in 12 digits
TRAILER_MAGIC = b"\nMHENV1:"
#: seconds the `sqlite3` shell may take for `.recover` before we fall back to reading rows
RECOVER_TIMEOUT = 300.0


def trailer(
    *,
    arrival: float,
    envelope: Envelope,
    recipients: Sequence[QueuedRecipient],
    header: bytes,
    size: int,
    body_crc: int,
) -> bytes:
    """The envelope record written after a body file's last byte (same fsync as the body)."""
    record = {
        "arrival": arrival,
        "envelope": envelope.to_dict(),
        "header": base64.b64encode(header).decode("ascii"),
        "size": size,
        "body_crc": body_crc,
        "recipients": [
            [r.address, r.original, list(r.notify), list(r.orcpt) if r.orcpt else None,
             int(r.hold)]
            for r in recipients
        ],
    }
    data = json.dumps(record, separators=(",", ":")).encode("utf-8")
    return data + TRAILER_MAGIC + b"%012d" % len(data)


def read_trailer(path: Path) -> dict[str, Any] | None:
    """The envelope record at the end of a body file (None: the file has none)."""
    footer = len(TRAILER_MAGIC) + 12
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        if end < footer:
            return None
        f.seek(end - footer)
        tail = f.read(footer)
        if not tail.startswith(TRAILER_MAGIC) or not tail[-12:].isdigit():
            return None
        length = int(tail[-12:])
        if length > end - footer:
            return None
        f.seek(end - footer - length)
        record: dict[str, Any] = json.loads(f.read(length))
    return record


def check(db: Path) -> str | None:
    """Why `db` cannot be trusted, or None if it passes `integrity_check` (or is absent
    from a spool that holds no message files either: a new spool)."""
    if not db.exists():
        bodies = db.parent / "bodies"
        if bodies.is_dir() and any(is_queue_id(e.name) for e in os.scandir(bodies)):
            return "queue.db is missing but bodies/ holds queued messages"
        return None
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=30.0)) as conn:
            rows = conn.execute("PRAGMA integrity_check(5)").fetchall()
            problems = [str(r[0]) for r in rows if r[0] != "ok"]
            if not problems:
                conn.execute("SELECT count(*) FROM message").fetchone()
    except sqlite3.DatabaseError as exc:
        return str(exc)
    return "; ".join(problems) or None


@dataclass(frozen=True, slots=True)
class SalvageReport:
    moved_to: Path
    from_rows: int
    from_files: int
    #: bodies/ files that had neither a readable row nor an envelope record (in quarantine/)
    unrecoverable: int


def salvage(root: Path, *, clock: float | None = None) -> SalvageReport:
    """Rebuild `root/queue.db` (see the module docstring). Nothing may have it open."""
    db = root / "queue.db"
    aside = root / f"damaged-{int(clock if clock is not None else time.time())}"
    aside.mkdir(mode=0o700, exist_ok=True)
    for name in ("queue.db", "queue.db-wal", "queue.db-shm"):
        if (root / name).exists():
            os.rename(root / name, aside / name)
    damaged = aside / "queue.db"
    with contextlib.closing(connect(db)) as conn:
        from_rows = _copy_rows(conn, damaged) if damaged.exists() else 0
        from_files = _from_trailers(conn, root / "bodies")
        unrecoverable = _without_record(conn, root / "bodies", root / "quarantine")
    log.warning(
        "spool %s: queue rebuilt: %d message(s) from the damaged database, %d from body "
        "files, %d body file(s) without an envelope (quarantined); damaged database kept in %s",
        root, from_rows, from_files, unrecoverable, aside,
    )
    return SalvageReport(aside, from_rows, from_files, unrecoverable)


def _copy_rows(conn: sqlite3.Connection, damaged: Path) -> int:
    """Copy what can be read of the damaged database's rows; returns the messages kept."""
    kept = 0
    with tempfile.TemporaryDirectory(dir=damaged.parent) as tmp:
        recovered = _recovered_copy(damaged, Path(tmp) / "recovered.db")
        for source in (damaged, recovered):
            if source is None:
                continue
            try:
                conn.execute("ATTACH DATABASE ? AS old", (str(source),))
            except sqlite3.DatabaseError as exc:
                log.warning("spool salvage: cannot read %s: %s", source.name, exc)
                continue
            try:
                kept = max(kept, _copy_attached(conn))
            finally:
                conn.execute("DETACH DATABASE old")
    return kept


def _recovered_copy(damaged: Path, out: Path) -> Path | None:
    """`.recover` with the sqlite3 shell (reads around damaged pages); None if unavailable."""
    shell = shutil.which("sqlite3")
    if shell is None:
        return None
    try:
        dump = subprocess.run(
            [shell, str(damaged), ".recover"],
            capture_output=True, timeout=RECOVER_TIMEOUT, check=False,
        )
        if dump.returncode != 0 and not dump.stdout:
            return None
        load = subprocess.run(
            [shell, str(out)], input=dump.stdout, capture_output=True,
            timeout=RECOVER_TIMEOUT, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("spool salvage: sqlite3 .recover failed: %s", exc)
        return None
    return out if load.returncode == 0 or out.exists() else None


def _rows(conn: sqlite3.Connection, sql: str) -> Iterator[Any]:
    """Rows until the end or the first damaged page, then (`sql` ends in an ORDER BY key
    without direction) from the other end back to the damage."""
    for direction in ("ASC", "DESC"):
        try:
            yield from conn.execute(f"{sql} {direction}")
            return  # read to the end: nothing damaged on the way
        except sqlite3.DatabaseError as exc:
            log.warning("spool salvage: stopped reading at damage: %s", exc)


def _copy_attached(conn: sqlite3.Connection) -> int:
    try:
        cols = [r[1] for r in conn.execute("PRAGMA old.table_info(message)")]
        rcols = [r[1] for r in conn.execute("PRAGMA old.table_info(recipient)")]
    except sqlite3.DatabaseError as exc:
        log.warning("spool salvage: no readable schema in the damaged database: %s", exc)
        return 0
    mine = {r[1] for r in conn.execute("PRAGMA main.table_info(message)")}
    rmine = {r[1] for r in conn.execute("PRAGMA main.table_info(recipient)")}
    cols = [c for c in cols if c in mine]
    rcols = [c for c in rcols if c in rmine]
    if "qid" not in cols or "qid" not in rcols:
        return 0
    copied = 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        names = ", ".join(cols)
        marks = ", ".join("?" for _ in cols)
        for row in _rows(conn, f"SELECT {names} FROM old.message ORDER BY qid"):
            try:
                conn.execute(f"INSERT OR IGNORE INTO message ({names}) VALUES ({marks})", row)
                copied += 1
            except sqlite3.Error as exc:
                log.warning("spool salvage: message row skipped: %s", exc)
        rnames = ", ".join(rcols)
        rmarks = ", ".join("?" for _ in rcols)
        for row in _rows(conn, f"SELECT {rnames} FROM old.recipient ORDER BY qid"):
            with contextlib.suppress(sqlite3.Error):
                conn.execute(f"INSERT OR IGNORE INTO recipient ({rnames}) VALUES ({rmarks})", row)
        # a message whose recipients were all lost cannot be delivered from its row alone
        conn.execute(
            "DELETE FROM message WHERE NOT EXISTS"
            " (SELECT 1 FROM recipient AS r WHERE r.qid = message.qid)"
        )
        (kept,) = conn.execute("SELECT count(*) FROM message").fetchone()
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return int(kept)


def _from_trailers(conn: sqlite3.Connection, bodies: Path) -> int:
    added = 0
    known = {q for (q,) in conn.execute("SELECT qid FROM message")}
    for entry in sorted(os.scandir(bodies), key=lambda e: e.name):
        qid = entry.name
        if not is_queue_id(qid) or qid in known:
            continue
        try:
            record = read_trailer(Path(entry.path))
            if record is None:
                continue
            recipients = [
                QueuedRecipient(a, o, tuple(n), (oc[0], oc[1]) if oc else None, Hold(h))
                for a, o, n, oc, h in record["recipients"]
            ]
            conn.execute("BEGIN IMMEDIATE")
            try:
                queries.insert_message(
                    conn, qid, float(record["arrival"]),
                    Envelope.from_dict(record["envelope"]),
                    base64.b64decode(record["header"]), None, int(record["size"]),
                    recipients, body_crc=int(record["body_crc"]),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except (OSError, ValueError, KeyError, TypeError, sqlite3.Error) as exc:
            log.warning("spool salvage: %s: unreadable envelope record: %s", qid, exc)
            continue
        log.info("%s: restored from the envelope record of its body file", qid)
        added += 1
    return added


def _without_record(conn: sqlite3.Connection, bodies: Path, quarantine: Path) -> int:
    """Body files nothing describes (no row, no envelope record): moved to quarantine/ (recovery would delete them as
    never committed), for an administrator to look at."""
    known = {q for (q,) in conn.execute("SELECT qid FROM message")}
    lost = [e.name for e in os.scandir(bodies) if is_queue_id(e.name) and e.name not in known]
    quarantine.mkdir(mode=0o700, exist_ok=True)
    for qid in lost:
        log.error("spool salvage: %s: body file without envelope: moved to quarantine/", qid)
        with contextlib.suppress(OSError):
            os.rename(bodies / qid, quarantine / qid)
    return len(lost)
