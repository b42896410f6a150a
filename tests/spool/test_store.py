"""Spool: what is committed is on disk and comes back after a reopen; group commit batches."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import tracemalloc
from pathlib import Path

import pytest
from tests.fakes import FailingCommit, FakeClock, envelope, put, queued

from mailhaven.proto.envelope import RecipientSpec
from mailhaven.proto.replies import Reply
from mailhaven.spool import (
    Hold,
    QueuedRecipient,
    RecipientKey,
    RecipientUpdate,
    Spool,
    Status,
    list_queue,
    queries,
)
from mailhaven.spool.committer import savepoint
from mailhaven.spool.ids import QueueIdFactory, is_queue_id


async def test_commit_survives_reopen(tmp_path: Path, clock: FakeClock) -> None:
    root = tmp_path / "q"
    s = Spool(root, inline_limit=1000, clock=clock)
    s.open()
    small = await put(s, b"Subject: small\r\n\r\nhi\r\n", "b@example.net")
    big_body = os.urandom(5000)
    w = s.new_message()
    for i in range(0, len(big_body), 333):
        w.write(big_body[i : i + 333])
    rcpts = [
        QueuedRecipient("x@example.net", "list@example.org", ("FAILURE",), ("rfc822", "list@x")),
        QueuedRecipient("y@example.com", "list@example.org"),
    ]
    env = envelope("list@example.org").__class__(
        "alice@example.org", (RecipientSpec("list@example.org", ("FAILURE",)),), dsn_ret="HDRS"
    )
    big = await s.commit(w, env, rcpts, b"Received: by us\r\n")
    s.close()

    assert (root / "bodies" / big).read_bytes()[: len(big_body)] == big_body  # + trailer
    assert not (root / "bodies" / small).exists()  # small bodies live in the database
    assert list((root / "tmp").iterdir()) == []

    s = Spool(root, inline_limit=1000, clock=clock)
    report = s.open()
    try:
        assert report.messages == 2 and not report.quarantined
        msg = await s.load(big)
        assert msg is not None and msg.envelope == env
        with msg.open() as f:
            assert f.read() == b"Received: by us\r\n" + big_body
        assert msg.size == len(b"Received: by us\r\n") + len(big_body)
        with await s.open_body(small) as f:
            assert f.read() == b"Received: test\r\nSubject: small\r\n\r\nhi\r\n"
        states = await s.recipients(big)
        assert [(r.address, r.original, r.notify, r.orcpt) for r in states] == [
            ("x@example.net", "list@example.org", ("FAILURE",), ("rfc822", "list@x")),
            ("y@example.com", "list@example.org", (), None),
        ]
        due = await s.due(clock.now, 10)
        assert {(d.queue_id, d.address) for d in due} == {
            (small, "b@example.net"), (big, "x@example.net"), (big, "y@example.com"),
        }
    finally:
        s.close()


async def test_group_commit_batches_concurrent_commits(spool: Spool) -> None:
    """While the writer is stuck in one transaction, 50 commits queue up; they all go into
    (at most) one more transaction, not 50."""
    gate = threading.Event()
    first = threading.Event()

    def checkpoint(point: str) -> None:
        if point == "before_commit" and not first.is_set():
            first.set()
            assert gate.wait(30)

    spool._committer._checkpoint = checkpoint  # test seam: the same hook `Spool(checkpoint=)` sets
    before = spool.stats.transactions
    tasks = [asyncio.create_task(put(spool, b"m%d" % i)) for i in range(50)]
    await asyncio.sleep(0)  # every task runs up to its commit, which is now queued
    gate.set()
    ids = await asyncio.gather(*tasks)
    assert len(set(ids)) == 50
    assert spool.stats.transactions - before <= 2
    assert spool.stats.largest_batch >= 49


async def test_failing_job_does_not_spoil_its_batch(spool: Spool) -> None:
    ok = await put(spool, b"one")

    def boom(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO message (qid) VALUES ('x')")  # violates NOT NULL

    with pytest.raises(sqlite3.IntegrityError):
        await spool._committer.run(boom)
    assert (await spool.load(ok)) is not None
    assert await put(spool, b"two")


async def test_an_atomic_job_runs_without_a_savepoint_and_a_block_can_make_its_own(
    spool: Spool,
) -> None:
    kept = await put(spool, b"kept")

    def half_then_fail(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE message SET warned = 1 WHERE qid = ?", (kept,))
        with savepoint(conn):
            conn.execute("UPDATE message SET size = 0 WHERE qid = ?", (kept,))
            conn.execute("INSERT INTO message (qid) VALUES ('x')")  # violates NOT NULL

    with pytest.raises(sqlite3.IntegrityError):
        await spool._committer.run(half_then_fail, atomic=True)
    [[warned, size]] = await spool._committer.run(
        lambda c: c.execute("SELECT warned, size FROM message WHERE qid = ?", (kept,)).fetchall(),
        write=False,
    )
    # no savepoint around the job: its first statement stays; the block went as a whole
    assert warned == 1 and size != 0


async def test_a_message_that_cannot_store_its_recipients_leaves_no_row(spool: Spool) -> None:
    qid = spool.new_message().queue_id
    # a stray recipient row with the same key makes the recipient insert fail half-way
    await spool._committer.run(
        lambda c: c.execute(
            "INSERT INTO recipient (qid, idx, address, domain, original, status, next_attempt)"
            " VALUES (?, 1, 'b@x', 'x', 'b@x', 'pending', 0)",
            (qid,),
        )
    )

    def insert(conn: sqlite3.Connection) -> None:
        queries.insert_message(
            conn, qid, 0.0, envelope("a@x", "b@x"), b"H: v\r\n", b"body", 10, queued("a@x", "b@x")
        )

    with pytest.raises(sqlite3.IntegrityError):
        await spool._committer.run(insert, atomic=True)
    rows = await spool._committer.run(
        lambda c: c.execute(
            "SELECT (SELECT count(*) FROM message WHERE qid = ?1),"
            " (SELECT count(*) FROM recipient WHERE qid = ?1)",
            (qid,),
        ).fetchone(),
        write=False,
    )
    assert rows == (0, 0)  # the message row went, and (trigger) every recipient row with it


async def test_deleting_a_message_deletes_its_recipients(spool: Spool) -> None:
    gone = await put(spool, b"gone", "a@x.example", "b@x.example")
    stays = await put(spool, b"stays", "c@x.example")
    assert await spool.remove(gone)
    counts = await spool._committer.run(
        lambda c: c.execute("SELECT qid, count(*) FROM recipient GROUP BY qid").fetchall(),
        write=False,
    )
    assert counts == [(stays, 1)]


async def test_big_body_streams_to_file_without_buffering(tmp_path: Path) -> None:
    limit = 64 * 1024
    s = Spool(tmp_path / "q", inline_limit=limit)
    s.open()
    try:
        chunk = b"x" * 65_536
        tracemalloc.start()
        w = s.new_message()
        peak_buffered = 0
        for _ in range(160):  # 10 MiB
            w.write(chunk)
            peak_buffered = max(peak_buffered, w.buffered)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert w.spilled and w.size == 160 * len(chunk)
        assert peak_buffered <= limit
        assert peak < 2 * 1024 * 1024  # chunk buffers, not the message
        assert w.head(5) == b"xxxxx"
        qid = await s.commit(w, envelope("b@x.example"), queued("b@x.example"), b"R: 1\r\n")
        assert (s.bodies_dir / qid).stat().st_size > 160 * len(chunk)  # + envelope trailer
        assert list(s.tmp_dir.iterdir()) == []
        assert await s.size(qid) == 160 * len(chunk) + 6
    finally:
        s.close()


async def test_a_failed_background_write_is_never_committed(spool: Spool) -> None:
    """Spilled bodies are written on a background thread; its error must reach the writer."""
    w = spool.new_message()
    w.write(b"y" * 10_000)  # spilled: beyond the 4096 inline limit of the fixture
    assert w.spilled and w._file is not None

    def disk_full(data: bytes) -> int:
        raise OSError(28, "No space left on device")

    w._file.write = disk_full  # type: ignore[method-assign]
    w.write(b"z" * 100)
    with pytest.raises(OSError, match="No space"):
        await spool.commit(w, envelope("b@x.example"), queued("b@x.example"), b"R: 1\r\n")
    assert await spool.due(1e12, 10) == []
    w.abort()
    assert list(spool.tmp_dir.iterdir()) == []


async def test_abort_discards_everything(spool: Spool) -> None:
    w = spool.new_message()
    w.write(b"y" * 10_000)  # beyond the 4096 inline limit of the fixture
    assert w.spilled and len(list(spool.tmp_dir.iterdir())) == 1
    w.abort()
    assert list(spool.tmp_dir.iterdir()) == []
    with pytest.raises(ValueError):
        w.write(b"more")
    with pytest.raises(RuntimeError), spool.new_message() as w2:
        w2.write(b"z" * 10_000)
        raise RuntimeError("session died")
    assert list(spool.tmp_dir.iterdir()) == []


async def test_commit_failure_in_hook_leaves_nothing_acknowledged(tmp_path: Path) -> None:
    failing = FailingCommit()
    s = Spool(tmp_path / "q", inline_limit=100, checkpoint=failing)
    s.open()
    failing.armed = True
    try:
        w = s.new_message()
        w.write(b"b" * 1000)
        with pytest.raises(OSError):
            await s.commit(w, envelope("r@x.example"), queued("r@x.example"), b"")
        assert list(s.bodies_dir.iterdir()) == []
        assert list(list_queue(s.root)) == []
    finally:
        s.close()


async def test_scheduler_state_round_trip(spool: Spool, clock: FakeClock) -> None:
    qid = await put(spool, b"body", "a@one.example", "b@two.example")
    due = await spool.due(clock.now, 10)
    assert [d.attempts for d in due] == [0, 0]
    await spool.claim([due[0].key])
    assert [d.address for d in await spool.due(clock.now, 10)] == ["b@two.example"]
    r451 = Reply(451, "connect timed out", "4.4.1")
    remaining = await spool.record(qid, [
        RecipientUpdate(0, Status.SENT, None, Reply(250, "ok", "2.0.0"), relay="mx[1.2.3.4]"),
        RecipientUpdate(1, Status.DEFERRED, clock.now + 300, r451),
    ])
    assert remaining == 1
    assert await spool.due(clock.now, 10) == []
    assert await spool.next_due_time() == clock.now + 300
    states = await spool.recipients(qid)
    assert states[0].status is Status.SENT and states[0].last_relay == "mx[1.2.3.4]"
    assert states[1].status is Status.DEFERRED and states[1].attempts == 1
    assert states[1].last_reply == r451 and not states[1].active
    later = await spool.due(clock.now + 300, 10)
    assert [(d.address, d.attempts) for d in later] == [("b@two.example", 1)]

    assert await spool.hold(qid) == 1
    assert await spool.due(clock.now + 300, 10) == []
    assert await spool.release(qid) == 1
    assert len(await spool.due(clock.now + 300, 10)) == 1
    assert await spool.requeue(qid) == 1
    assert len(await spool.due(clock.now, 10)) == 1

    assert await spool.remove(qid) is True
    assert await spool.load(qid) is None and await spool.recipients(qid) == []
    assert await spool.remove(qid) is False


async def test_route_hold_and_release_domain(spool: Spool, clock: FakeClock) -> None:
    qid = await put(spool, b"body", "a@part.example", "b@other.example")
    await spool.hold_recipients([RecipientKey(qid, 0)], Hold.ROUTE)
    assert [d.address for d in await spool.due(clock.now, 10)] == ["b@other.example"]
    assert await spool.release(qid) == 0  # an admin release does not lift a route hold
    assert await spool.release_domain("PART.example") == 1
    assert {d.address for d in await spool.due(clock.now, 10)} == {
        "a@part.example", "b@other.example",
    }


async def test_finished_messages_are_found(spool: Spool) -> None:
    qid = await put(spool, b"body")
    await spool.record(qid, [RecipientUpdate(0, Status.SENT, None, Reply(250, "ok", None))])
    assert await spool.finished() == [qid]


async def test_listing_read_only_while_open(spool: Spool, clock: FakeClock) -> None:
    a = await put(spool, b"first", "one@example.net")
    b = await put(spool, b"second" * 1000, "two@example.net", "three@example.net")
    await spool.hold(b)
    listed = list(list_queue(spool.root))
    assert [m.queue_id for m in listed] == sorted([a, b])
    by_id = {m.queue_id: m for m in listed}
    assert by_id[a].sender == "alice@example.org" and by_id[a].arrival == clock.now
    assert by_id[b].size == len(b"Received: test\r\n") + 6000
    assert [r.address for r in by_id[b].recipients] == ["two@example.net", "three@example.net"]
    assert all(r.hold == Hold.ADMIN for r in by_id[b].recipients)
    assert list(list_queue(spool.root.parent / "nowhere")) == []


def test_queue_ids_unique_and_increasing_with_a_stuck_clock() -> None:
    make = QueueIdFactory(clock=lambda: 1_700_000_000.0)
    ids = [make() for _ in range(70_000)]  # more than the 4-digit counter span
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(is_queue_id(i) for i in ids[:100])
    assert not is_queue_id("../etc/passwd") and not is_queue_id("")


async def test_record_and_finish_removes_only_what_owes_no_report(spool: Spool) -> None:
    ok = Reply(250, "ok", "2.0.0")
    done = await put(spool, b"done", "a@x.example", "b@x.example")
    assert await spool.record_and_finish(done, [RecipientUpdate(0, Status.SENT, None, ok)]) == (
        1,
        False,
    )
    assert await spool.record_and_finish(done, [RecipientUpdate(1, Status.SENT, None, ok)]) == (
        0,
        True,
    )
    assert await spool.load(done) is None
    failed = await put(spool, b"failed", "c@x.example")
    bounce = RecipientUpdate(0, Status.BOUNCED, None, Reply(550, "no such user", "5.1.1"))
    assert await spool.record_and_finish(failed, [bounce]) == (0, False)
    assert await spool.load(failed) is not None  # kept for the bounce hook
    assert await spool.finished() == [failed]
    # the short way (all delivered at once, big body): rows and body file go in one job
    w = spool.new_message()
    w.write(b"x" * (spool.inline_limit + 1))
    big = await spool.commit(w, envelope("d@x.example", "e@x.example"),
                             queued("d@x.example", "e@x.example"), b"Received: t\r\n")
    sent = [RecipientUpdate(i, Status.SENT, None, ok) for i in (0, 1)]
    assert await spool.record_and_finish(big, sent) == (0, True)
    assert await spool.load(big) is None and not (spool.bodies_dir / big).exists()
    # NOTIFY=SUCCESS is owed a report: the message is kept, with the result stored
    w = spool.new_message()
    w.write(b"notify")
    loud = await spool.commit(w, envelope("f@x.example"),
                              [QueuedRecipient("f@x.example", "f@x.example", ("SUCCESS",))],
                              b"Received: t\r\n")
    assert await spool.record_and_finish(loud, sent[:1]) == (0, False)
    [state] = await spool.recipients(loud)
    assert state.status is Status.SENT and state.last_reply == ok
    assert sorted(await spool.finished()) == sorted([failed, loud])


async def test_commit_claimed_hands_back_the_message_and_recovery_frees_the_claims(
    tmp_path: Path, clock: FakeClock
) -> None:
    """The scheduler's fast path: committed as in flight, so no due() returns it; the handed
    back message is what load() would give; a crash before the attempt (here: a reopen) makes
    the recipients due again, held ones stay held."""
    root = tmp_path / "q"
    s = Spool(root, inline_limit=1000, clock=clock)
    s.open()
    w = s.new_message()
    w.write(b"Subject: fast\r\n\r\nhi\r\n")
    rcpts = [QueuedRecipient("a@example.net", "a@example.net"),
             QueuedRecipient("h@held.example", "h@held.example", hold=Hold.ROUTE)]
    fresh = await s.commit_claimed(w, envelope("a@example.net", "h@held.example"), rcpts,
                                   b"Received: test\r\n")
    qid = fresh.message.queue_id
    assert [(r.queue_id, r.index, r.address, r.attempts) for r in fresh.recipients] == [
        (qid, 0, "a@example.net", 0)
    ]
    assert fresh.message == await s.load(qid)
    w2 = s.new_message()
    w2.write(b"x" * 5000)  # a spilled body is handed back by path
    big = await s.commit_claimed(w2, envelope("b@example.net"), queued("b@example.net"),
                                 b"Received: test\r\n")
    assert big.message == await s.load(big.message.queue_id)
    assert big.message.body_path is not None and big.message.inline_body is None
    assert await s.due(clock.now, 10) == []
    assert [r.active for r in await s.recipients(qid)] == [True, False]
    s.close()
    s = Spool(root, inline_limit=1000, clock=clock)
    s.open()
    try:
        assert sorted(d.address for d in await s.due(clock.now, 10)) == [
            "a@example.net", "b@example.net"
        ]
    finally:
        s.close()


# -- damaged or exposed spools (issue 16, item 23): a body file changed in place, even to the same
# size, is quarantined instead of sent; a spool every user may read is not served

BIG = b"Subject: big\r\n\r\n" + b"0123456789abcdef" * 1024  # over the 4 KiB inline limit


async def test_a_body_damaged_to_the_same_size_is_quarantined(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    qid = await put(spool, BIG, "bob@example.net")
    path = spool.bodies_dir / qid
    assert (await spool.load_to_send(qid)) is not None  # intact: loads
    data = bytearray(path.read_bytes())
    data[5000] ^= 0x20  # one flipped bit: same size, different bytes
    path.write_bytes(bytes(data))
    # a lookup (a notice, the log) does not read the body; an attempt to send it does
    assert await spool.load(qid) is not None and path.exists()
    with caplog.at_level(logging.WARNING, logger="mailhaven.spool"):
        assert await spool.load_to_send(qid) is None
    assert f"{qid}: quarantined: body file does not match its checksum" in caplog.text
    [state] = await spool.recipients(qid)
    assert state.hold & Hold.QUARANTINE and not state.active
    assert spool.quarantined_body(qid) is not None and not path.exists()
    assert await spool.due(2_000_000_000.0, 10) == []


async def test_an_intact_big_body_reads_back_whole(spool: Spool) -> None:
    qid = await put(spool, BIG, "bob@example.net")
    msg = await spool.load_to_send(qid)
    assert msg is not None and msg.body_crc is not None
    with msg.open() as f:
        assert f.read().endswith(BIG)


def test_a_world_readable_spool_is_refused(tmp_path: Path, clock: FakeClock) -> None:
    root = tmp_path / "spool"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    s = Spool(root, clock=clock)
    with pytest.raises(PermissionError, match=r"accessible to every user.*chmod o-rwx"):
        s.open()
    os.chmod(root, 0o700)
    s.open()
    s.close()
