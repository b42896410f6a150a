"""Pickup: drop files into the queue, at least once, corrupt files set aside, never a crash."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from mailhaven.intake.cleanup import Intake, Outcome, Refused
from mailhaven.pickup.collector import (
    BodyWriter,
    CorruptDrop,
    IntakeDoor,
    Pickup,
    envelope_from_meta,
)
from mailhaven.pickup.dropfile import DropDirs, DropWriter
from mailhaven.proto.envelope import Envelope
from mailhaven.proto.replies import Reply
from mailhaven.scheduler.active import ActiveQueue
from mailhaven.spool import Spool, list_queue


def meta(*rcpts: str, sender: str = "alice@example.org", **extra: Any) -> dict[str, Any]:
    return {
        "sender": sender,
        "recipients": [{"address": r, "notify": [], "orcpt": None} for r in rcpts],
        "body_type": None,
        **extra,
    }


def drop(root: Path, body: bytes, *rcpts: str, **kw: Any) -> str:
    dirs = DropDirs(root)
    dirs.create()
    w = DropWriter(dirs, meta(*(rcpts or ("bob@example.net",)), **kw))
    w.write(body)
    return w.commit()


@pytest.fixture
def intake(spool: Spool) -> Intake:
    return Intake(ActiveQueue(spool, wake=lambda: None), hostname="mx.test", expand=lambda a: [a])


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "maildrop"


def queued(spool: Spool) -> list[Any]:
    return list(list_queue(spool.root))


async def test_collect_queues_each_file_and_removes_it(
    spool: Spool, intake: Intake, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    big = b"Subject: big\r\n\r\n" + b"x" * 78 + b"\r\n"
    drop(root, b"Subject: one\r\n\r\nhello\r\n", "bob@example.net", "carl@example.net")
    drop(root, big * 2000, sender="")  # spills to a file in the spool (inline limit 4096)
    pickup = Pickup(root, IntakeDoor(spool, intake))
    with caplog.at_level(logging.INFO, logger="mailhaven.pickup"):
        assert await pickup.collect() == 2
    assert os.listdir(root / "new") == []
    msgs = queued(spool)
    assert [m.sender for m in msgs] == ["alice@example.org", ""]
    assert [r.address for r in msgs[0].recipients] == ["bob@example.net", "carl@example.net"]
    stored = await spool.load(msgs[0].queue_id)
    assert stored is not None
    assert stored.open().read().endswith(b"\r\nSubject: one\r\n\r\nhello\r\n")
    assert stored.envelope.protocol == "local" and stored.envelope.extra["uid"] == str(os.getuid())
    big_stored = await spool.load(msgs[1].queue_id)
    assert big_stored is not None and big_stored.open().read().endswith(big * 2000)
    lines = [r.getMessage() for r in caplog.records if r.name == "mailhaven.pickup"]
    assert f"{msgs[0].queue_id}: uid={os.getuid()} from=<alice@example.org>" in lines
    assert await pickup.collect() == 0


async def test_eight_bit_body_without_declaration_becomes_8bitmime(
    spool: Spool, intake: Intake, root: Path
) -> None:
    drop(root, "Subject: café\r\n\r\nça va\r\n".encode())
    assert await Pickup(root, IntakeDoor(spool, intake)).collect() == 1
    stored = await spool.load(queued(spool)[0].queue_id)
    assert stored is not None and stored.envelope.body_type == "8BITMIME"


async def test_a_drop_file_without_headers_is_queued_with_the_separator(
    spool: Spool, intake: Intake, root: Path
) -> None:
    """Issue 16 #1 on the pickup path: the body line must not become a header."""
    drop(root, b"look ma no headers!\r\n")
    assert await Pickup(root, IntakeDoor(spool, intake)).collect() == 1
    stored = await spool.load(queued(spool)[0].queue_id)
    assert stored is not None
    with stored.open() as f:
        parsed = email.message_from_bytes(f.read(), policy=email.policy.default)
    assert parsed.defects == [] and parsed.get_content() == "look ma no headers!\r\n"


async def test_corrupt_files_are_quarantined_and_the_rest_collected(
    spool: Spool, intake: Intake, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = drop(root, b"Subject: ok\r\n\r\nok\r\n")
    new = root / "new"
    (new / "0.1.deadbeef").write_bytes(b"garbage\n")
    truncated = drop(root, b"Subject: t\r\n\r\n" + b"y" * 100)
    with open(new / truncated, "r+b") as f:
        f.truncate(os.path.getsize(new / truncated) - 10)
    (new / "editor-backup~").write_bytes(b"x")
    secret = root.parent / "secret"
    secret.write_bytes(b"do not mail me")
    os.symlink(secret, new / "1.1.cafebabe")
    no_rcpt = drop(root, b"x\r\n", "bob@example.net")
    path = new / no_rcpt
    path.write_bytes(path.read_bytes().replace(b'"bob@example.net"', b'"bad address!"'))
    pickup = Pickup(root, IntakeDoor(spool, intake))
    with caplog.at_level(logging.WARNING, logger="mailhaven.pickup"):
        assert await pickup.collect() == 1
    assert os.listdir(new) == []
    assert sorted(os.listdir(root / "corrupt")) == sorted(
        ["0.1.deadbeef", truncated, "editor-backup~", "1.1.cafebabe", no_rcpt]
    )
    assert len(queued(spool)) == 1 and good not in os.listdir(root / "corrupt")
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert "bad first line" in warnings and "size mismatch" in warnings
    assert "symbolic link" in warnings
    assert secret.read_bytes() == b"do not mail me"


async def test_a_crash_between_commit_and_delete_duplicates_never_loses(
    spool: Spool, intake: Intake, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drop(root, b"Subject: once\r\n\r\nhi\r\n")
    pickup = Pickup(root, IntakeDoor(spool, intake))

    def crash(path: Path) -> None:
        raise OSError("power cut after the queue commit")

    monkeypatch.setattr(pickup, "_remove", crash)
    assert await pickup.collect() == 0  # logged, not raised
    assert len(queued(spool)) == 1 and len(os.listdir(root / "new")) == 1
    monkeypatch.undo()
    restarted = Pickup(root, IntakeDoor(spool, intake))
    assert await restarted.collect() == 1
    assert len(queued(spool)) == 2  # a duplicate, no loss
    assert os.listdir(root / "new") == []


class FailingDoor:
    """Raises at submit time (disk full in the spool) the first `failures` times."""

    def __init__(self, inner: IntakeDoor, failures: int) -> None:
        self.inner = inner
        self.failures = failures
        self.aborted = 0

    def new_message(self) -> BodyWriter:
        return self.inner.new_message()

    async def submit(self, writer: BodyWriter, envelope: Envelope) -> Outcome:
        if self.failures:
            self.failures -= 1
            writer.abort()
            self.aborted += 1
            raise OSError("No space left on device")
        return await self.inner.submit(writer, envelope)


async def test_a_failed_submit_keeps_the_file_for_the_next_round(
    spool: Spool, intake: Intake, root: Path
) -> None:
    drop(root, b"Subject: retry\r\n\r\nhi\r\n")
    door = FailingDoor(IntakeDoor(spool, intake), failures=1)
    pickup = Pickup(root, door)
    assert await pickup.collect() == 0
    assert len(os.listdir(root / "new")) == 1 and queued(spool) == []
    assert await pickup.collect() == 1
    assert len(queued(spool)) == 1


class RefusingDoor(FailingDoor):
    async def submit(self, writer: BodyWriter, envelope: Envelope) -> Outcome:
        writer.abort()
        return Refused(Reply(554, "Too many hops", "5.4.6"))


async def test_a_refused_message_is_set_aside(spool: Spool, intake: Intake, root: Path) -> None:
    name = drop(root, b"Subject: loop\r\n\r\nhi\r\n")
    assert await Pickup(root, RefusingDoor(IntakeDoor(spool, intake), 0)).collect() == 0
    assert os.listdir(root / "corrupt") == [name]


class FullDoor(FailingDoor):
    """Intake's answer on a full spool: a temporary refusal, the first `failures` times."""

    async def submit(self, writer: BodyWriter, envelope: Envelope) -> Outcome:
        if self.failures:
            self.failures -= 1
            writer.abort()
            return Refused(Reply(452, "Insufficient system storage", "4.3.1"))
        return await self.inner.submit(writer, envelope)


async def test_a_temporary_refusal_keeps_the_file_for_the_next_round(
    spool: Spool, intake: Intake, root: Path
) -> None:
    drop(root, b"Subject: later\r\n\r\nhi\r\n")
    pickup = Pickup(root, FullDoor(IntakeDoor(spool, intake), failures=1))
    assert await pickup.collect() == 0
    assert len(os.listdir(root / "new")) == 1 and queued(spool) == []
    assert not (root / "corrupt").exists() or os.listdir(root / "corrupt") == []
    assert await pickup.collect() == 1
    assert len(queued(spool)) == 1


async def test_stale_tmp_files_are_removed(spool: Spool, intake: Intake, root: Path) -> None:
    DropDirs(root).create()
    old = root / "tmp" / "1.2.abcdef01"
    old.write_bytes(b"half")
    os.utime(old, (1_000_000, 1_000_000))
    fresh = root / "tmp" / "2.2.abcdef01"
    fresh.write_bytes(b"being written")
    await Pickup(root, IntakeDoor(spool, intake)).collect()
    assert os.listdir(root / "tmp") == ["2.2.abcdef01"]


async def test_run_collects_when_poked(spool: Spool, intake: Intake, root: Path) -> None:
    pickup = Pickup(root, IntakeDoor(spool, intake))
    pickup.prepare()
    task = asyncio.create_task(pickup.run(poll_interval=3600))
    try:
        drop(root, b"Subject: poke\r\n\r\nhi\r\n")
        pickup.wake()
        for _ in range(500):
            if queued(spool):
                break
            await asyncio.sleep(0.01)
        assert len(queued(spool)) == 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.parametrize(
    "bad",
    [
        {"sender": 3},
        {"recipients": []},
        {"recipients": [{"address": "a b@c"}]},
        {"recipients": [{"address": "a@c", "notify": ["SOMETIMES"]}]},
        {"recipients": [{"address": "a@c", "orcpt": ["rfc822"]}]},
        {"body_type": "9BIT"},
        {"dsn_ret": "ALL"},
        {"dsn_envid": "x\ny"},
        {"smtputf8": "yes"},
        {"sender": "<a@b>"},
    ],
)
def test_meta_validation(bad: dict[str, Any]) -> None:
    base = meta("bob@example.net")
    with pytest.raises(CorruptDrop):
        envelope_from_meta({**base, **bad}, uid=1000, eight_bit=False)


def test_meta_never_carries_client_facts() -> None:
    forged = {
        **meta("bob@example.net"),
        "client_address": "10.0.0.1",
        "auth_user": "admin",
        "helo": "trusted.example",
    }
    env = envelope_from_meta(forged, uid=1000, eight_bit=False)
    assert (env.client_address, env.auth_user, env.helo) == ("", None, "")
    assert env.extra == {"uid": "1000", "origin": "pickup"}


async def test_arrival_is_when_the_file_reached_the_maildrop(tmp_path: Path, root: Path) -> None:
    """`delay=` counts from the maildrop's arrival (Postfix keeps the posting time), not from
    the pickup: mail that waited in the maildrop while the daemon was down shows that wait."""
    name = drop(root, b"Subject: waited\r\n\r\nhi\r\n")
    dropped = os.stat(root / "new" / name).st_ctime
    later = dropped + 3600.0  # the daemon came up an hour later
    spool = Spool(tmp_path / "spool2", clock=lambda: later)
    await asyncio.to_thread(spool.open)
    try:
        intake = Intake(
            ActiveQueue(spool, wake=lambda: None), hostname="mx.test", expand=lambda a: [a]
        )
        assert await Pickup(root, IntakeDoor(spool, intake)).collect() == 1
        [msg] = queued(spool)
        assert msg.arrival == pytest.approx(dropped, abs=1.0)
        [due] = await spool.due(later, 10)
        assert due.arrival == pytest.approx(dropped, abs=1.0)
    finally:
        await asyncio.to_thread(spool.close)
