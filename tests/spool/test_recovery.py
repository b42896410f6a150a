"""Crash at every commit step (a real `os._exit` in a subprocess), damaged entries, and the
due-query plan on a large queue."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tests.fakes import put

from mailhaven.spool import Hold, Spool, list_queue
from mailhaven.spool.queries import DUE_SQL, NEXT_DUE_SQL
from mailhaven.spool.schema import connect

WRITER = textwrap.dedent(
    """
    import asyncio, os, sys
    from pathlib import Path
    from mailhaven.spool import Spool, QueuedRecipient
    from mailhaven.proto.envelope import Envelope, RecipientSpec

    root, point, crash_at, size, concurrency = (
        Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    seen = 0
    armed = False

    def checkpoint(name):
        global seen
        if armed and name == point:
            seen += 1
            if seen == crash_at:
                os._exit(9)

    async def one(s, i):
        w = s.new_message()
        w.write(bytes([65 + i]) * size)
        env = Envelope("s@example.org", (RecipientSpec("r@example.net"),))
        qid = await s.commit(w, env, [QueuedRecipient("r@example.net", "r@example.net")],
                             b"Received: %d\\r\\n" % i)
        sys.stdout.write(f"{qid} {i}\\n")
        sys.stdout.flush()

    async def main():
        global armed
        s = Spool(root, inline_limit=1024, checkpoint=checkpoint)
        s.open()
        armed = True
        for batch in range(0, 6, concurrency):
            await asyncio.gather(*(one(s, i) for i in range(batch, batch + concurrency)))
        os._exit(0)

    asyncio.run(main())
    """
)

POINTS = ["body_written", "body_synced", "body_linked", "before_commit", "after_commit"]


def run_writer(root: Path, point: str, crash_at: int, size: int, concurrency: int) -> tuple[
    int, dict[str, int]
]:
    proc = subprocess.run(
        [sys.executable, "-c", WRITER, str(root), point, str(crash_at), str(size),
         str(concurrency)],
        capture_output=True, timeout=60, check=False,
    )
    acked = {}
    # Only complete lines count: the crash may cut the writer's last line short.
    for line in proc.stdout.decode().split("\n")[:-1]:
        qid, i = line.split()
        acked[qid] = int(i)
    return proc.returncode, acked


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize(("size", "concurrency"), [(100, 1), (5000, 1), (5000, 3), (100, 3)])
async def test_crash_at_each_commit_step(
    tmp_path: Path, point: str, size: int, concurrency: int
) -> None:
    root = tmp_path / "q"
    code, acked = run_writer(root, point, 2, size, concurrency)
    if size <= 1024 and point.startswith("body_"):
        assert code == 0  # small bodies never reach the file steps
    else:
        assert code == 9, "the crash was injected"
        assert len(acked) < 6

    s = Spool(root, inline_limit=1024)
    report = s.open()
    try:
        assert report.quarantined == ()
        listed = {m.queue_id: m for m in list_queue(root)}
        # Nothing acknowledged is lost, and it is intact.
        assert set(acked) <= set(listed)
        for qid, i in acked.items():
            with await s.open_body(qid) as f:
                assert f.read() == b"Received: %d\r\n" % i + bytes([65 + i]) * size
        # Anything else present (committed, crash before the ack) is complete too.
        for qid, m in listed.items():
            with await s.open_body(qid) as f:
                data = f.read()
            assert len(data) == m.size
            assert data.endswith(data[-1:] * size)
        # Nothing half-written is left around.
        assert list((root / "tmp").iterdir()) == []
        assert {p.name for p in (root / "bodies").iterdir()} <= set(listed)
    finally:
        s.close()


async def test_damaged_entries_are_quarantined_and_the_rest_recovered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "q"
    s = Spool(root, inline_limit=100)
    s.open()
    good_small = await put(s, b"small")
    good_big = await put(s, b"G" * 500)
    missing = await put(s, b"M" * 500)
    truncated = await put(s, b"T" * 500)
    s.close()
    (root / "bodies" / missing).unlink()
    (root / "bodies" / truncated).write_bytes(b"T" * 10)
    (root / "tmp" / "half-received").write_bytes(b"partial")
    orphan = "0" * 15
    (root / "bodies" / orphan).write_bytes(b"linked but never committed")

    s = Spool(root, inline_limit=100)
    with caplog.at_level("WARNING", logger="mailhaven.spool"):
        report = s.open()
    try:
        assert set(report.quarantined) == {missing, truncated}
        assert report.discarded_temp == 1 and report.discarded_orphans == 1
        assert f"{missing}: quarantined: body file missing" in caplog.text
        assert f"{truncated}: quarantined: body size 10 != 500 committed" in caplog.text
        assert (root / "quarantine" / truncated).read_bytes() == b"T" * 10
        assert not (root / "bodies" / orphan).exists()
        due = {d.queue_id for d in await s.due(1e12, 100)}
        assert due == {good_small, good_big}
        assert await s.load(missing) is None
        listed = {m.queue_id: m for m in list_queue(root)}
        assert listed[truncated].quarantined
        assert all(r.hold & Hold.QUARANTINE for r in listed[truncated].recipients)
        with await s.open_body(good_big) as f:
            assert f.read().endswith(b"G" * 500)
    finally:
        s.close()
    # A second start-up does not quarantine again or lose anything.
    s = Spool(root, inline_limit=100)
    assert s.open().quarantined == ()
    s.close()


async def test_in_flight_recipients_are_attemptable_after_restart(tmp_path: Path) -> None:
    root = tmp_path / "q"
    s = Spool(root)
    s.open()
    await put(s, b"x")
    [due] = await s.due(1e12, 10)
    await s.claim([due.key])
    assert await s.due(1e12, 10) == []
    s.close()  # "crash" while the attempt was in flight
    s = Spool(root)
    assert s.open().reactivated == 1
    try:
        assert [d.key for d in await s.due(1e12, 10)] == [due.key]
    finally:
        s.close()


def test_due_query_uses_the_index_on_a_large_queue(tmp_path: Path) -> None:
    conn = connect(tmp_path / "queue.db")
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO message (qid, arrival, sender, envelope, header, body, size)"
        " VALUES (?, 0, 's', '{}', x'', x'', 0)",
        [(f"Q{i:014d}",) for i in range(100_000)],
    )
    conn.executemany(
        "INSERT INTO recipient (qid, idx, address, domain, original, status, next_attempt)"
        " VALUES (?, 0, 'r@d', 'd', 'r@d', 'deferred', ?)",
        [(f"Q{i:014d}", 1000.0 + i) for i in range(100_000)],
    )
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    explain = conn.execute("EXPLAIN QUERY PLAN " + DUE_SQL, ("deferred", 5000.0, 10))
    plan = " | ".join(row[3] for row in explain)
    assert "USING INDEX recipient_due" in plan or "USING COVERING INDEX recipient_due" in plan
    assert "SCAN r" not in plan and "SCAN recipient" not in plan
    assert "USE TEMP B-TREE" not in plan  # ordered by the index, no sort of the backlog
    explain = conn.execute("EXPLAIN QUERY PLAN " + NEXT_DUE_SQL, ("deferred",))
    plan = " | ".join(row[3] for row in explain)
    assert "recipient_due" in plan and "SCAN" not in plan
    rows = conn.execute(DUE_SQL, ("deferred", 1005.0, 100)).fetchall()
    assert [r[5] for r in rows] == [1000.0 + i for i in range(6)]
    conn.close()
    assert sqlite3.sqlite_version_info >= (3, 8, 0)
