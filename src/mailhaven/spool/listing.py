"""Read-only queue listing for `mailq` / `mailhaven queue list`.

Opens `queue.db` read-only (`mode=ro`), so it can run in another process while the daemon is
writing: WAL gives it a consistent snapshot without blocking the writer. It streams: two cursors
ordered by queue id are merged, so listing 100,000 messages holds one message in memory at a time.

It never touches body files and never recovers anything; that is the daemon's job.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

from mailhaven.spool.queries import RECIPIENT_COLUMNS, recipient_from_row
from mailhaven.spool.records import MessageSummary, RecipientState
from mailhaven.spool.schema import connect


def list_queue(root: Path) -> Iterator[MessageSummary]:
    """Every queued message, oldest queue id first, with its recipients' state."""
    db = root / "queue.db"
    if not db.exists():
        return
    with closing(connect(db, read_only=True)) as conn:
        conn.execute("BEGIN")  # one snapshot for both cursors
        messages = conn.execute(
            "SELECT qid, arrival, size, sender, quarantined FROM message ORDER BY qid"
        )
        rcpts = conn.execute(
            f"SELECT qid, {RECIPIENT_COLUMNS} FROM recipient ORDER BY qid, idx"
        )
        pending = rcpts.fetchone()
        for qid, arrival, size, sender, quarantined in messages:
            mine: list[RecipientState] = []
            while pending is not None and pending[0] <= qid:
                if pending[0] == qid:
                    mine.append(recipient_from_row(pending[1:]))
                pending = rcpts.fetchone()
            yield MessageSummary(qid, arrival, size, sender, bool(quarantined), tuple(mine))
        conn.execute("COMMIT")
