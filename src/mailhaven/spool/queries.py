"""The spool's SQL, as plain functions of a connection (the writer thread runs them as jobs).

Each function is one step of one job; none commits (the committer owns transactions). Rows are
turned into records here and nowhere else, so the column layout of `schema.py` stays private to
this package.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mailhaven.proto.envelope import Envelope
from mailhaven.proto.replies import Reply
from mailhaven.spool.records import (
    DueRecipient,
    Hold,
    QueuedRecipient,
    RecipientKey,
    RecipientState,
    RecipientUpdate,
    Status,
    StoredMessage,
)

_UNFINISHED = (Status.PENDING.value, Status.DEFERRED.value)


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def insert_message(
    conn: sqlite3.Connection,
    queue_id: str,
    arrival: float,
    envelope: Envelope,
    header: bytes,
    body: bytes | None,
    size: int,
    recipients: Sequence[QueuedRecipient],
    *,
    claimed: bool = False,
    body_crc: int | None = None,
) -> None:
    """`claimed`: recipients not held are stored in flight (`active`), for the scheduler's
    fast path (`Spool.commit_claimed`). Atomic by itself (the committer's `atomic` job): when
    the recipients cannot be stored, the message row goes again, and with it (trigger) any
    recipient row already written; a failed statement undoes only itself in SQLite."""
    conn.execute(
        "INSERT INTO message (qid, arrival, sender, envelope, header, body, body_file, size,"
        " body_crc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            queue_id,
            arrival,
            envelope.sender,
            json.dumps(envelope.to_dict(), separators=(",", ":")),
            header,
            body,
            int(body is None),
            size,
            body_crc,
        ),
    )
    try:
        _insert_recipients(conn, queue_id, arrival, recipients, claimed)
    except sqlite3.Error:
        conn.execute("DELETE FROM message WHERE qid = ?", (queue_id,))
        raise


def _insert_recipients(
    conn: sqlite3.Connection,
    queue_id: str,
    arrival: float,
    recipients: Sequence[QueuedRecipient],
    claimed: bool,
) -> None:
    conn.executemany(
        "INSERT INTO recipient (qid, idx, address, domain, original, notify, orcpt, status,"
        " hold, active, next_attempt) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                queue_id,
                i,
                r.address,
                domain_of(r.address),
                r.original,
                ",".join(r.notify),
                f"{r.orcpt[0]};{r.orcpt[1]}" if r.orcpt else None,
                Status.PENDING.value,
                int(r.hold),
                int(claimed and not r.hold),
                arrival,
            )
            for i, r in enumerate(recipients)
        ],
    )


#: parameters: status, now, limit
DUE_SQL = (
    "SELECT r.qid, r.idx, r.address, r.original, r.attempts, r.next_attempt, m.arrival"
    " FROM recipient AS r JOIN message AS m ON m.qid = r.qid"
    " WHERE r.status = ? AND r.hold = 0 AND r.active = 0 AND r.next_attempt <= ?"
    " ORDER BY r.next_attempt LIMIT ?"
)
#: parameter: status
NEXT_DUE_SQL = (
    "SELECT min(next_attempt) FROM recipient WHERE status = ? AND hold = 0 AND active = 0"
)


def select_due(conn: sqlite3.Connection, now: float, limit: int) -> list[DueRecipient]:
    """Up to `limit` new (never tried) and up to `limit` deferred recipients due at `now`,
    each group oldest first. Both are range scans of `recipient_due`."""
    out: list[DueRecipient] = []
    for status in _UNFINISHED:
        rows = conn.execute(DUE_SQL, (status, now, limit))
        out.extend(
            DueRecipient(
                queue_id=q, index=i, address=a, original=o, attempts=n, arrival=arr,
                next_attempt=t,
            )
            for q, i, a, o, n, t, arr in rows
        )
    return out




def next_due(conn: sqlite3.Connection) -> float | None:
    """The earliest `next_attempt` of any attemptable recipient (an index probe per status)."""
    best: float | None = None
    for status in _UNFINISHED:
        (value,) = conn.execute(NEXT_DUE_SQL, (status,)).fetchone()
        if value is not None and (best is None or value < best):
            best = float(value)
    return best


def set_active(conn: sqlite3.Connection, keys: Iterable[RecipientKey], active: bool) -> None:
    conn.executemany(
        "UPDATE recipient SET active = ? WHERE qid = ? AND idx = ?",
        [(int(active), k.queue_id, k.index) for k in keys],
    )


def claim(conn: sqlite3.Connection, keys: Iterable[RecipientKey]) -> list[RecipientKey]:
    """Mark recipients in flight, but only those still attemptable (unfinished, not held, not
    already in flight): the scheduler may plan from a list read a moment ago, and an operator's
    hold or delete in between must win. Returns the keys actually claimed."""
    claimed: list[RecipientKey] = []
    for k in keys:
        cur = conn.execute(
            "UPDATE recipient SET active = 1 WHERE qid = ? AND idx = ?"
            " AND active = 0 AND hold = 0 AND status IN (?, ?)",
            (k.queue_id, k.index, *_UNFINISHED),
        )
        if cur.rowcount == 1:
            claimed.append(k)
    return claimed


def add_hold(conn: sqlite3.Connection, keys: Iterable[RecipientKey], reason: Hold) -> None:
    conn.executemany(
        "UPDATE recipient SET hold = hold | ?, active = 0 WHERE qid = ? AND idx = ?",
        [(int(reason), k.queue_id, k.index) for k in keys],
    )


def apply_updates(
    conn: sqlite3.Connection, queue_id: str, updates: Sequence[RecipientUpdate], now: float
) -> int:
    """Store attempt results; return how many recipients of the message are still unfinished."""
    conn.executemany(
        "UPDATE recipient SET status = ?, active = 0, attempts = attempts + ?,"
        " next_attempt = coalesce(?, next_attempt), last_attempt = ?,"
        " last_code = coalesce(?, last_code), last_dsn = coalesce(?, last_dsn),"
        " last_text = coalesce(?, last_text), last_relay = coalesce(?, last_relay),"
        " notify = CASE WHEN ? THEN"
        " trim(replace(',' || upper(notify) || ',', ',SUCCESS,', ','), ',') ELSE notify END"
        " WHERE qid = ? AND idx = ?",
        [
            (
                u.status.value,
                int(u.attempted),
                u.next_attempt,
                now if u.attempted else None,
                u.reply.code if u.reply else None,
                u.reply.dsn if u.reply else None,
                _reply_text(u.reply) if u.reply else None,
                u.relay,
                u.notify_passed,
                queue_id,
                u.index,
            )
            for u in updates
        ],
    )
    return unfinished_count(conn, queue_id)


def unfinished_count(conn: sqlite3.Connection, queue_id: str) -> int:
    (n,) = conn.execute(
        "SELECT count(*) FROM recipient WHERE qid = ? AND status IN (?, ?)",
        (queue_id, *_UNFINISHED),
    ).fetchone()
    return int(n)


def _reply_text(reply: Reply) -> str:
    return "\n".join(reply.lines)


def load_message(conn: sqlite3.Connection, queue_id: str, bodies: Path) -> StoredMessage | None:
    row = conn.execute(
        "SELECT arrival, envelope, header, body, body_file, size, body_crc FROM message"
        " WHERE qid = ? AND quarantined = 0",
        (queue_id,),
    ).fetchone()
    if row is None:
        return None
    arrival, envelope, header, body, body_file, size, body_crc = row
    return StoredMessage(
        queue_id=queue_id,
        envelope=Envelope.from_dict(json.loads(envelope)),
        arrival=arrival,
        header=bytes(header),
        size=size,
        inline_body=None if body_file else bytes(body or b""),
        body_path=bodies / queue_id if body_file else None,
        body_crc=body_crc,
    )


RECIPIENT_COLUMNS = (
    "idx, address, original, notify, orcpt, status, hold, active, attempts, next_attempt,"
    " last_code, last_dsn, last_text, last_attempt, last_relay"
)


#: stored text -> Status, and stored bits -> Hold, by table: calling the enum classes was a
#: fifth of `queue list`'s time at 100k messages (EnumType.__call__ per row)
_STATUS_OF = {s.value: s for s in Status}
_HOLD_OF = {int(h): h for h in (Hold(bits) for bits in range(8))}


def recipient_from_row(row: Sequence[Any]) -> RecipientState:
    (idx, address, original, notify, orcpt, status, hold, active, attempts, next_attempt,
     code, dsn, text, last_attempt, last_relay) = row
    reply = None
    if code is not None:
        first, *more = (text or "").split("\n")
        reply = Reply(int(code), first, dsn or None, tuple(more))
    orcpt_pair = None
    if orcpt:
        kind, _, addr = orcpt.partition(";")
        orcpt_pair = (kind, addr)
    return RecipientState(
        index=idx,
        address=address,
        original=original,
        notify=tuple(x for x in (notify or "").split(",") if x),
        orcpt=orcpt_pair,
        status=_STATUS_OF.get(status) or Status(status),
        hold=_HOLD_OF[hold] if hold in _HOLD_OF else Hold(hold),  # Hold.NONE is falsy
        active=bool(active),
        attempts=attempts,
        next_attempt=next_attempt,
        last_reply=reply,
        last_attempt=last_attempt,
        last_relay=last_relay,
    )


def select_recipients(conn: sqlite3.Connection, queue_id: str) -> list[RecipientState]:
    rows = conn.execute(
        f"SELECT {RECIPIENT_COLUMNS} FROM recipient WHERE qid = ? ORDER BY idx", (queue_id,)
    )
    return [recipient_from_row(r) for r in rows]


def delete_message(conn: sqlite3.Connection, queue_id: str) -> bool | None:
    """Delete a message and (by the schema's trigger) its recipients; returns whether its body
    is a file (None: no such message)."""
    row = conn.execute(
        "DELETE FROM message WHERE qid = ? RETURNING body_file", (queue_id,)
    ).fetchone()
    return None if row is None else bool(row[0])


def remove_if_quiet(conn: sqlite3.Connection, queue_id: str) -> bool | None:
    """Delete a finished message that owes nobody a report (no recipient bounced, none asked
    for NOTIFY=SUCCESS); returns whether its body is a file, or None when it was kept."""
    (loud,) = conn.execute(
        "SELECT count(*) FROM recipient WHERE qid = ? AND (status = ? OR instr(notify, ?) > 0)",
        (queue_id, Status.BOUNCED.value, "SUCCESS"),
    ).fetchone()
    return None if loud else delete_message(conn, queue_id)


def delete_if_delivered(
    conn: sqlite3.Connection, queue_id: str, delivered: Sequence[int]
) -> bool | None:
    """The common end of a message: the recipients `delivered` just got 250 and every other
    one was delivered before, and nobody asked for NOTIFY=SUCCESS. Then delete the message
    (and, by the trigger, its recipients) without storing the results first: ONE statement,
    atomic by itself. Returns whether its body is a file, or None when nothing was deleted
    and the message must go the long way (`apply_updates`)."""
    marks = ",".join(f"?{i}" for i in range(4, 4 + len(delivered)))
    row = conn.execute(
        "DELETE FROM message WHERE qid = ?1 AND NOT EXISTS (SELECT 1 FROM recipient"
        " WHERE qid = ?1 AND (instr(notify, ?2) > 0"
        f" OR (status != ?3 AND idx NOT IN ({marks}))))"
        " RETURNING body_file",
        (queue_id, "SUCCESS", Status.SENT.value, *delivered),
    ).fetchone()
    return None if row is None else bool(row[0])


def quarantine(conn: sqlite3.Connection, queue_id: str) -> None:
    """Set a damaged message aside: flagged, and its recipients held (`Hold.QUARANTINE`)."""
    conn.execute("UPDATE message SET quarantined = 1 WHERE qid = ?", (queue_id,))
    conn.execute(
        "UPDATE recipient SET hold = hold | ?, active = 0 WHERE qid = ?",
        (int(Hold.QUARANTINE), queue_id),
    )


def finished_messages(conn: sqlite3.Connection) -> list[str]:
    """Messages with no unfinished recipient left (a crash hit between record and remove)."""
    rows = conn.execute(
        "SELECT m.qid FROM message AS m WHERE m.quarantined = 0 AND NOT EXISTS"
        " (SELECT 1 FROM recipient AS r WHERE r.qid = m.qid AND r.status IN (?, ?))",
        _UNFINISHED,
    )
    return [q for (q,) in rows]


def change_hold(
    conn: sqlite3.Connection, queue_id: str, reason: Hold, on: bool, now: float
) -> int:
    if on:
        cur = conn.execute(
            "UPDATE recipient SET hold = hold | ? WHERE qid = ? AND status IN (?, ?)",
            (int(reason), queue_id, *_UNFINISHED),
        )
    else:
        cur = conn.execute(
            "UPDATE recipient SET hold = hold & ?, next_attempt = min(next_attempt, ?)"
            " WHERE qid = ? AND hold & ? != 0",
            (~int(reason), now, queue_id, int(reason)),
        )
    return cur.rowcount


def mark_warned(conn: sqlite3.Connection, queue_id: str) -> bool:
    """Test-and-set of the message's delay-warning flag: True only the first time."""
    cur = conn.execute("UPDATE message SET warned = 1 WHERE qid = ? AND warned = 0", (queue_id,))
    return cur.rowcount == 1


def release_domain(conn: sqlite3.Connection, domain: str, now: float) -> int:
    """Clear the route hold of `domain`'s recipients; returns how many *messages* (RFC 1985 §5
    counts messages, not recipients) had a recipient released."""
    rows = conn.execute(
        "UPDATE recipient SET hold = hold & ?, next_attempt = ?"
        " WHERE domain = ? AND hold != 0 AND hold & ? != 0 AND status IN (?, ?) RETURNING qid",
        (~int(Hold.ROUTE), now, domain.lower(), int(Hold.ROUTE), *_UNFINISHED),
    ).fetchall()
    return len({qid for (qid,) in rows})


def requeue(conn: sqlite3.Connection, queue_id: str | None, now: float) -> int:
    """Make unfinished recipients due now (one message, or all with `queue_id=None`)."""
    if queue_id is None:
        cur = conn.execute(
            "UPDATE recipient SET next_attempt = ? WHERE status = ? AND next_attempt > ?",
            (now, Status.DEFERRED.value, now),
        )
    else:
        cur = conn.execute(
            "UPDATE recipient SET next_attempt = ? WHERE qid = ? AND status IN (?, ?)",
            (now, queue_id, *_UNFINISHED),
        )
    return cur.rowcount


def queue_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """See `Spool.counts`; two scans, no per-row Python (a status request, not the hot path)."""
    messages = int(conn.execute("SELECT count(*) FROM message").fetchone()[0])
    row = conn.execute(
        "SELECT"
        " coalesce(sum(active = 1), 0),"
        " coalesce(sum(active = 0 AND hold = 0 AND status = 'pending'), 0),"
        " coalesce(sum(active = 0 AND hold = 0 AND status = 'deferred'), 0),"
        " coalesce(sum(active = 0 AND hold != 0), 0)"
        " FROM recipient WHERE status IN ('pending', 'deferred')"
    ).fetchone()
    active, incoming, deferred, held = (int(n) for n in row)
    return {"messages": messages, "active": active, "incoming": incoming,
            "deferred": deferred, "held": held}
