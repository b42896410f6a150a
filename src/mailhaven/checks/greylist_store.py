"""The greylist's durable memory: triplets and auto-allowed clients in a SQLite file.

In: a client address, sender, recipient and `now` (wall-clock seconds). Out: the
`checks.greylist.Decision`, after its new state is committed. `check` is the async door: the
SQLite work runs in a worker thread (one lock around the one connection), so the event loop
never waits on the disk.

Durability: its own database (`<state_dir>/greylist.sqlite`, apart from the spool's, so a
flood of greylisted clients never contends with queue commits), WAL with synchronous=NORMAL:
a committed entry survives a restart or a crash of the process; a power loss may forget the
last few, which only greylists those clients once more, so the spool's fsync-per-commit would
buy nothing here.

Bounded: every PURGE_EVERY checks (and at open) entries past their use (`greylist.expired`)
are deleted, and past `max_entries` triplets the least recently seen go first.

SECURITY: sender and recipient are the client's words; they are bound as SQL parameters, never
formatted into statements. The file holds addresses of correspondents: 0600.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from pathlib import Path

from mailhaven.checks.greylist import (
    Decision,
    Entry,
    GreylistSettings,
    client_allowed,
    client_key,
    decide,
    triplet_key,
)

PURGE_EVERY = 1000
SCHEMA = """
CREATE TABLE IF NOT EXISTS triplets (
    key TEXT PRIMARY KEY, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    passed INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS triplets_last_seen ON triplets (last_seen);
CREATE TABLE IF NOT EXISTS clients (
    key TEXT PRIMARY KEY, passes INTEGER NOT NULL, last_seen REAL NOT NULL
);
"""


class GreylistStore:
    def __init__(self, path: Path, settings: GreylistSettings) -> None:
        self.path = path
        self.settings = settings
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._since_purge = 0

    def open(self) -> None:
        with self._lock:
            if self._db is not None:
                return
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            self._db = db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    async def check(self, client: str, sender: str, recipient: str, now: float) -> Decision:
        return await asyncio.to_thread(self.check_now, client, sender, recipient, now)

    def check_now(self, client: str, sender: str, recipient: str, now: float) -> Decision:
        """The decision for one triplet, committed (synchronous: tests and the thread)."""
        self.open()
        with self._lock:
            db = self._db
            assert db is not None
            settings = self.settings
            ckey = client_key(client)
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute(
                    "SELECT passes, last_seen FROM clients WHERE key = ?", (ckey,)
                ).fetchone()
                if row is not None and client_allowed(row[0], row[1], now, settings):
                    db.execute("UPDATE clients SET last_seen = ? WHERE key = ?", (now, ckey))
                    decision = Decision(True, reason="client allowed")
                else:
                    decision = self._triplet(db, triplet_key(client, sender, recipient), now)
                    if decision.first_pass:
                        db.execute(
                            "INSERT INTO clients (key, passes, last_seen) VALUES (?, 1, ?) "
                            "ON CONFLICT (key) DO UPDATE SET passes = passes + 1, "
                            "last_seen = excluded.last_seen",
                            (ckey, now),
                        )
                self._since_purge += 1
                if self._since_purge >= PURGE_EVERY:
                    self._purge(db, now)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return decision

    def _triplet(self, db: sqlite3.Connection, key: str, now: float) -> Decision:
        row = db.execute(
            "SELECT first_seen, last_seen, passed FROM triplets WHERE key = ?", (key,)
        ).fetchone()
        entry = Entry(row[0], row[1], bool(row[2])) if row is not None else None
        decision, new = decide(entry, now, self.settings)
        db.execute(
            "INSERT OR REPLACE INTO triplets (key, first_seen, last_seen, passed) "
            "VALUES (?, ?, ?, ?)",
            (key, new.first_seen, new.last_seen, int(new.passed)),
        )
        return decision

    def purge(self, now: float) -> None:
        self.open()
        with self._lock:
            assert self._db is not None
            self._purge(self._db, now)

    def _purge(self, db: sqlite3.Connection, now: float) -> None:
        """Forget what `greylist.expired` says is of no use, then the oldest past the bound."""
        self._since_purge = 0
        s = self.settings
        db.execute(
            "DELETE FROM triplets WHERE (passed = 1 AND last_seen < ?) OR "
            "(passed = 0 AND first_seen < ?)",
            (now - s.allow_lifetime, now - s.retry_window),
        )
        db.execute("DELETE FROM clients WHERE last_seen < ?", (now - s.allow_lifetime,))
        (count,) = db.execute("SELECT count(*) FROM triplets").fetchone()
        if count > s.max_entries:
            db.execute(
                "DELETE FROM triplets WHERE key IN "
                "(SELECT key FROM triplets ORDER BY last_seen LIMIT ?)",
                (count - s.max_entries,),
            )

    def count(self) -> int:
        self.open()
        with self._lock:
            assert self._db is not None
            return int(self._db.execute("SELECT count(*) FROM triplets").fetchone()[0])
