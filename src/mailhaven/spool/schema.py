"""The spool's SQLite schema and connection settings.

One database file, `queue.db`, in WAL mode with `synchronous=FULL`: a COMMIT returns only after
the WAL is fsync'd, which is what makes "250 queued" a promise across power loss. Readers (the
`mailq` CLI) open the same file read-only while the daemon writes; WAL lets them.

Tables:
- `message`: one row per queued message: envelope (JSON of `Envelope.to_dict()`), arrival,
  trace header, and the body either inline (`body` BLOB) or in `bodies/<qid>` (`body_file` = 1).
  `quarantined` marks a message whose stored body was found damaged at recovery (or, by its
  `body_crc`, the CRC-32 of a body file, before a delivery); `warned` that its sender was sent
  a delay warning (at most once per message).
- `recipient`: one row per final recipient with its delivery state. `hold` is a `Hold` bit set;
  `active` = 1 while a delivery attempt is in flight (reset at start-up: at-least-once).
  Deleting a `message` row deletes its recipients (trigger `message_takes_recipients`), so
  removing a message is one statement: the spool's cost is mostly per statement, not per row.
  Added to existing spools by `connect`
  (CREATE ... IF NOT EXISTS); an older mailhaven works on such a spool unchanged.

`recipient_due` orders unfinished recipients by (status, hold, active, next_attempt), so "what is
due now", "when is the next one due" and "new mail first" are index range scans; a queue of
100,000 deferred messages costs a B-tree descent, never a scan.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS message (
    qid         TEXT PRIMARY KEY,
    arrival     REAL NOT NULL,
    sender      TEXT NOT NULL,
    envelope    TEXT NOT NULL,
    header      BLOB NOT NULL,
    body        BLOB,
    body_file   INTEGER NOT NULL DEFAULT 0,
    size        INTEGER NOT NULL,
    quarantined INTEGER NOT NULL DEFAULT 0,
    warned      INTEGER NOT NULL DEFAULT 0,
    body_crc    INTEGER
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS recipient (
    qid          TEXT NOT NULL,
    idx          INTEGER NOT NULL,
    address      TEXT NOT NULL,
    domain       TEXT NOT NULL,
    original     TEXT NOT NULL,
    notify       TEXT NOT NULL DEFAULT '',
    orcpt        TEXT,
    status       TEXT NOT NULL,
    hold         INTEGER NOT NULL DEFAULT 0,
    active       INTEGER NOT NULL DEFAULT 0,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_attempt REAL,
    last_code    INTEGER,
    last_dsn     TEXT,
    last_text    TEXT,
    last_relay   TEXT,
    PRIMARY KEY (qid, idx)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS recipient_due
    ON recipient (status, hold, active, next_attempt);
CREATE INDEX IF NOT EXISTS recipient_active ON recipient (active) WHERE active = 1;
CREATE INDEX IF NOT EXISTS recipient_held_domain ON recipient (domain) WHERE hold != 0;

CREATE TRIGGER IF NOT EXISTS message_takes_recipients AFTER DELETE ON message
BEGIN
    DELETE FROM recipient WHERE qid = old.qid;
END;
"""


def connect(
    path: Path, *, read_only: bool = False, any_thread: bool = False
) -> sqlite3.Connection:
    """Open the queue database with the settings the durability promise depends on.

    The connection is in autocommit mode (`isolation_level=None`): transactions are explicit
    `BEGIN IMMEDIATE` / `COMMIT`, issued only by the spool's committer. `any_thread`: the
    committer passes the connection between its writer thread and the event loop (never
    using it from both at once; see `committer.py`).
    """
    if read_only:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)
        conn.execute("PRAGMA query_only = ON")
        return conn
    conn = sqlite3.connect(
        path, isolation_level=None, timeout=30.0, check_same_thread=not any_thread
    )
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise RuntimeError(f"{path}: cannot enable WAL (journal_mode={mode})")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = OFF")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        conn.close()
        raise RuntimeError(f"{path}: queue schema {version} is newer than this mailhaven")
    conn.executescript(SCHEMA)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(message)")}
    if "body_crc" not in columns:  # a spool made before body checksums: add the column
        conn.execute("ALTER TABLE message ADD COLUMN body_crc INTEGER")
    if version != SCHEMA_VERSION:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return conn
