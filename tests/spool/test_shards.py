"""Queue shards: naming, the merged listing, and adoption of an orphan shard (crash-safe)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from tests.fakes import FakeClock, put

from mailhaven.spool import Spool, list_queue
from mailhaven.spool.lock import DaemonLock, lock_path, lock_queue
from mailhaven.spool.shards import (
    adopt,
    adopt_orphans,
    existing_shards,
    list_all,
    orphans,
    shard_index,
    shard_path,
)

BIG = b"x" * 10_000 + b"\r\n"  # over the inline limit below: a body file


def make(path: Path, clock: FakeClock) -> Spool:
    spool = Spool(path, inline_limit=4096, clock=clock)
    spool.open()
    return spool


def test_names(tmp_path: Path) -> None:
    main = tmp_path / "spool"
    assert shard_path(main, 0) == main
    assert shard_path(main, 3) == tmp_path / "spool-3"
    assert [shard_index(Path(n)) for n in ("spool-1", "spool-12", "spool-01", "spool-x",
                                           "spool", "other-1")] == [1, 12, None, None, None, None]
    for name in ("spool-10", "spool-2", "spool-x"):
        (tmp_path / name).mkdir()
    (tmp_path / "spool-5").write_text("a file, not a shard")
    assert existing_shards(main) == [main, tmp_path / "spool-2", tmp_path / "spool-10"]
    assert orphans(main, 2) == [tmp_path / "spool-2", tmp_path / "spool-10"]
    assert orphans(main, 3) == [tmp_path / "spool-10"]


async def test_list_all_merges_the_shards_in_queue_id_order(
    tmp_path: Path, clock: FakeClock
) -> None:
    a, b = make(tmp_path / "spool", clock), make(tmp_path / "spool-1", clock)
    try:
        ids = []
        for i in range(6):
            clock.now += 1
            ids.append(await put(a if i % 2 else b, b"x\r\n", f"r{i}@example.net"))
    finally:
        a.close()
        b.close()
    assert [m.queue_id for m in list_all(tmp_path / "spool")] == sorted(ids) == ids


async def test_adopt_moves_rows_and_bodies_then_deletes_the_orphan(
    tmp_path: Path, clock: FakeClock
) -> None:
    main, orphan = tmp_path / "spool", tmp_path / "spool-1"
    spool = make(main, clock)
    mine = await put(spool, b"small\r\n", "me@example.net")
    spool.close()
    other = make(orphan, clock)
    small = await put(other, b"small\r\n", "a@example.net", "b@example.net")
    big = await put(other, BIG, "c@example.net")
    other.close()
    assert adopt(main, orphan) == 2
    assert not orphan.exists()
    spool = make(main, clock)  # recovery checks the adopted body like its own
    try:
        got = {m.queue_id: [r.address for r in m.recipients] for m in list_queue(main)}
        assert got == {mine: ["me@example.net"], small: ["a@example.net", "b@example.net"],
                       big: ["c@example.net"]}
        loaded = await spool.load(big)
        assert loaded is not None and loaded.body_path is not None
        assert loaded.body_path.read_bytes()[: len(BIG)] == BIG  # then the envelope trailer
    finally:
        spool.close()


async def test_adopting_again_after_a_crash_gives_the_same_queue(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A crash after the rows were copied but before the orphan was deleted: the next start
    adopts again; nothing is doubled and the orphan's own links kept the bodies."""
    main, orphan = tmp_path / "spool", tmp_path / "spool-1"
    make(main, clock).close()
    other = make(orphan, clock)
    big = await put(other, BIG, "c@example.net")
    other.close()
    saved = tmp_path / "saved"
    os.link(orphan / "queue.db", saved)  # the orphan as it was when the crash hit
    (tmp_path / "saved-bodies").mkdir()
    os.link(orphan / "bodies" / big, tmp_path / "saved-bodies" / big)
    assert adopt(main, orphan) == 1
    orphan.mkdir()
    (orphan / "bodies").mkdir()
    os.link(saved, orphan / "queue.db")
    os.link(tmp_path / "saved-bodies" / big, orphan / "bodies" / big)
    assert adopt(main, orphan) == 0  # already there
    [msg] = list_queue(main)
    assert msg.queue_id == big and len(msg.recipients) == 1
    assert (main / "bodies" / big).read_bytes()[: len(BIG)] == BIG


async def test_a_queue_id_clash_keeps_the_orphan(tmp_path: Path, clock: FakeClock) -> None:
    main, orphan = tmp_path / "spool", tmp_path / "spool-1"
    spool = make(main, clock)
    qid = await put(spool, b"mine\r\n", "me@example.net")
    spool.close()
    other = make(orphan, clock)
    theirs = await put(other, b"theirs\r\n", "you@example.net")
    other.close()
    with sqlite3.connect(orphan / "queue.db") as conn:  # give theirs the same id, later arrival
        conn.execute("UPDATE message SET qid = ?, arrival = arrival + 1 WHERE qid = ?",
                     (qid, theirs))
        conn.execute("UPDATE recipient SET qid = ? WHERE qid = ?", (qid, theirs))
    with pytest.raises(RuntimeError, match="also used"):
        adopt(main, orphan)
    assert (orphan / "queue.db").exists()
    assert [r.address for m in list_queue(orphan) for r in m.recipients] == ["you@example.net"]


async def test_adopt_orphans_leaves_a_locked_shard_for_the_next_start(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A worker of an old daemon may still hold its shard: that one waits, the others move."""
    main = tmp_path / "spool"
    make(main, clock).close()
    for k in (1, 2):
        other = make(tmp_path / f"spool-{k}", clock)
        await put(other, b"small\r\n", f"r{k}@example.net")
        other.close()
    held = DaemonLock.acquire(lock_path(tmp_path / "spool-2"))
    assert held is not None
    with held:
        adopt_orphans(main, 1)
    assert not (tmp_path / "spool-1").exists() and (tmp_path / "spool-2").exists()
    assert [m.recipients[0].address for m in list_queue(main)] == ["r1@example.net"]
    adopt_orphans(main, 1)  # the next start
    assert existing_shards(main) == [main] and len(list(list_queue(main))) == 2


def test_a_queue_in_use_cannot_be_served_twice(tmp_path: Path) -> None:
    with lock_queue(tmp_path / "spool"), pytest.raises(OSError, match="queue is in use"):
        lock_queue(tmp_path / "spool")
