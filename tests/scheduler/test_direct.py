"""Final delivery at commit time (`scheduler.direct`): which messages go straight into the
Maildirs, that each copy is the one the queued path would deliver, and that every recipient
whose copy fails ends up in the queue (or the commit fails and the client retries)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest
from tests.fakes import envelope, maildir_messages

from mailhaven.delivery.base import DeliveryRequest
from mailhaven.delivery.local import LocalAgent
from mailhaven.proto.envelope import Envelope
from mailhaven.routing.route import Route
from mailhaven.scheduler.active import ActiveQueue
from mailhaven.scheduler.direct import DirectDoor
from mailhaven.spool import Spool, list_queue
from mailhaven.spool.message_writer import MessageWriter
from mailhaven.spool.records import Hold, QueuedRecipient

HEADER = b"Received: from client.test by mx.test (mailhaven) with ESMTP id Q\r\n"
BODY = b"Subject: hi\r\nMessage-ID: <m@x>\r\n\r\nline one\r\n..dot\r\nend\r\n"


def route(address: str) -> Route:
    local, _, domain = address.partition("@")
    if domain == "example.org":
        return Route("local", f"{local.split('+')[0]}@example.org")
    if domain == "broken.example":
        raise RuntimeError("router failed")
    return Route("relay", domain)


class Fixture:
    def __init__(self, spool: Spool, root: Path, users: set[str] | None = None) -> None:
        self.spool = spool
        self.root = root
        self.wakes = 0
        self.queue = ActiveQueue(spool, wake=self.wake)
        self.agent = LocalAgent(root, "mx.test", users=(lambda: users) if users else None)
        self.enabled = True
        #: what the SMTP receiver would have marked on the writer (`MessageWriter.no_bare_cr`)
        self.no_bare_cr = False
        self.door = DirectDoor(
            self.queue, self.agent, route, enabled=lambda: self.enabled,
            users=(lambda: users) if users else None,
        )

    def wake(self) -> None:
        self.wakes += 1

    def writer(self, body: bytes = BODY) -> MessageWriter:
        w = self.spool.new_message()
        w.write(body)
        w.no_bare_cr = self.no_bare_cr
        return w

    async def commit(
        self, *rcpts: str | QueuedRecipient, body: bytes = BODY, env: Envelope | None = None
    ) -> tuple[str, bool]:
        """(queue id, whether the door logged final deliveries)."""
        recipients = [r if isinstance(r, QueuedRecipient) else QueuedRecipient(r, r)
                      for r in rcpts]
        w = self.writer(body)
        env = env or envelope(*(r.address for r in recipients), sender="sender@remote.example")
        report = await self.door.commit(w, env, recipients, HEADER, attemptable=True)
        if report is not None:
            report()
        return w.queue_id, report is not None

    def copies(self, user: str) -> list[bytes]:
        return maildir_messages(self.root / "example.org" / user)

    def queued(self) -> dict[str, list[str]]:
        return {
            m.queue_id: [r.address for r in m.recipients] for m in list_queue(self.spool.root)
        }


@pytest.fixture
def fx(spool: Spool, tmp_path: Path) -> Fixture:
    return Fixture(spool, tmp_path / "mail")


async def test_local_only_mail_is_delivered_and_never_queued(
    fx: Fixture, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mailhaven")
    qid, reported = await fx.commit("alice@example.org", "bob@example.org")
    assert reported
    assert fx.queued() == {} and fx.wakes == 0
    expected = b"Return-Path: <sender@remote.example>\nDelivered-To: alice@example.org\n"
    assert fx.copies("alice") == [expected + (HEADER + BODY).replace(b"\r\n", b"\n")]
    assert len(fx.copies("bob")) == 1
    lines = [r.getMessage() for r in caplog.records]
    sent = [line for line in lines if line.startswith(f"{qid}: to=<")]
    assert len(sent) == 2
    assert all(", relay=local, " in s and "dsn=2.0.0, status=sent (delivered to maildir)" in s
               for s in sent)
    assert lines[-1] == f"{qid}: removed"
    assert list((fx.spool.root / "tmp").iterdir()) == []


@pytest.mark.parametrize("clean", [False, True], ids=["unmarked", "no-bare-cr"])
@pytest.mark.parametrize("size", [len(BODY), 20_000])  # inline, and spilled to a file
async def test_the_copy_is_byte_for_byte_the_queued_paths(
    fx: Fixture, size: int, clean: bool
) -> None:
    body = BODY + b"x" * 70 + b"\r\n" * ((size - len(BODY)) // 72 + 1)
    fx.no_bare_cr = clean
    await fx.commit("alice@example.org", body=body)
    [direct] = fx.copies("alice")

    fx.enabled = False
    qid, reported = await fx.commit("alice@example.org", body=body)
    assert not reported and list(fx.queued()) == [qid]
    msg = await fx.spool.load(qid)
    assert msg is not None
    request = DeliveryRequest(qid, msg.envelope, ("alice@example.org",),
                              route("alice@example.org"), msg.open, msg.size)
    assert (await fx.agent.deliver(request)).replies["alice@example.org"].code == 250
    assert fx.copies("alice") == [direct, direct]  # the queued path's copy: the same bytes


@pytest.mark.parametrize(
    "recipients",
    [
        ["alice@example.org", "carol@remote.example"],  # one is relayed: all queued
        [QueuedRecipient("alice@example.org", "alice@example.org", hold=Hold.ROUTE)],
        [QueuedRecipient("alice@example.org", "alice@example.org", hold=Hold.ADMIN)],
        [QueuedRecipient("alice@example.org", "alice@example.org", notify=("SUCCESS",))],
        ["alice@example.org", "x@broken.example"],  # routing failed: the scheduler's to defer
    ],
    ids=["mixed", "route-hold", "admin-hold", "notify-success", "routing-error"],
)
async def test_other_mail_is_queued_whole(
    fx: Fixture, recipients: Sequence[str | QueuedRecipient]
) -> None:
    qid, reported = await fx.commit(*recipients)
    assert not reported
    assert len(fx.queued()[qid]) == len(recipients)
    assert fx.copies("alice") == []


async def test_switched_off_everything_is_queued(fx: Fixture) -> None:
    fx.enabled = False
    qid, reported = await fx.commit("alice@example.org")
    assert not reported and fx.queued() == {qid: ["alice@example.org"]}
    assert fx.copies("alice") == []


async def test_a_failed_copy_queues_that_recipient_alone(
    spool: Spool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mailhaven")
    fx = Fixture(spool, tmp_path / "mail", users={"alice@example.org"})
    qid, reported = await fx.commit("alice@example.org", "gone@example.org")
    assert reported
    assert len(fx.copies("alice")) == 1
    assert fx.queued() == {qid: ["gone@example.org"]}  # 550 there: the queued path bounces it
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"{qid}: direct delivery for <gone@example.org> failed, queued: 550 5.1.1" in line
               for line in lines)
    assert any(line.startswith(f"{qid}: to=<alice@example.org>") for line in lines)
    assert f"{qid}: removed" not in lines  # it is still queued
    msg = await spool.load(qid)
    assert msg is not None and msg.header == HEADER and msg.inline_body == BODY


async def test_an_io_error_queues_the_recipient(fx: Fixture) -> None:
    (fx.root / "example.org").mkdir(parents=True)
    (fx.root / "example.org" / "bob").write_text("not a maildir")
    qid, _ = await fx.commit("alice@example.org", "bob@example.org")
    assert fx.queued() == {qid: ["bob@example.org"]}
    assert len(fx.copies("alice")) == 1


class BrokenQueue(ActiveQueue):
    async def commit(self, *args: object, **kw: object) -> None:
        raise OSError(28, "No space left on device")


async def test_when_queuing_the_rest_fails_the_commit_fails_and_the_copies_stay(
    spool: Spool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mailhaven")
    fx = Fixture(spool, tmp_path / "mail", users={"alice@example.org"})
    fx.door = DirectDoor(BrokenQueue(spool, wake=fx.wake), fx.agent, route,
                         enabled=lambda: True, users=lambda: {"alice@example.org"})
    with pytest.raises(OSError):
        await fx.commit("alice@example.org", "gone@example.org")
    assert len(fx.copies("alice")) == 1  # at-least-once: the client's retry duplicates it
    lines = [r.getMessage() for r in caplog.records]
    assert any("to=<alice@example.org>" in line and "status=sent" in line for line in lines)
    assert any("the client's retry duplicates them" in line for line in lines)


async def test_a_marked_body_under_a_header_with_a_bare_cr_keeps_that_cr(fx: Fixture) -> None:
    """The writer's mark covers the body only: the header intake adds is checked here."""
    fx.no_bare_cr = True
    w = fx.writer()
    header = b"X-Added: a\rb\r\n"
    env = envelope("alice@example.org", sender="sender@remote.example")
    report = await fx.door.commit(
        w, env, [QueuedRecipient("alice@example.org", "alice@example.org")], header,
        attemptable=True,
    )
    assert report is not None
    [copy] = fx.copies("alice")
    assert copy.endswith(b"X-Added: a\rb\n" + BODY.replace(b"\r\n", b"\n"))


async def test_a_body_that_failed_to_reach_disk_takes_the_queue_path(fx: Fixture) -> None:
    w = fx.writer()
    w.error = OSError(28, "No space left on device")
    with pytest.raises(OSError):
        await fx.door.commit(w, envelope("alice@example.org"),
                             [QueuedRecipient("alice@example.org", "alice@example.org")],
                             HEADER, attemptable=True)
    assert fx.copies("alice") == []


async def test_a_cancelled_commit_finishes_and_logs_its_copies(
    fx: Fixture, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, "mailhaven")
    import threading

    gate = threading.Event()
    real = fx.agent.deliver_blocking

    def slow(*args: object, **kw: object) -> object:
        gate.wait(5)
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(fx.agent, "deliver_blocking", slow)
    task = asyncio.create_task(fx.commit("alice@example.org"))
    await asyncio.sleep(0.05)
    task.cancel()
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        if fx.copies("alice") and any("not acknowledged" in r.getMessage()
                                      for r in caplog.records):
            break
        await asyncio.sleep(0.02)
    assert len(fx.copies("alice")) == 1
    assert any("to=<alice@example.org>" in r.getMessage() for r in caplog.records)


async def test_copies_are_made_on_the_doors_own_few_threads(
    fx: Fixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from mailhaven.scheduler import direct

    seen: set[str] = set()
    real = fx.agent.deliver_blocking

    def recording(*args: object, **kw: object) -> object:
        seen.add(threading.current_thread().name)
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(fx.agent, "deliver_blocking", recording)
    await asyncio.gather(*(fx.commit(f"u{i}@example.org") for i in range(20)))
    assert all(name.startswith("maildir") for name in seen)
    assert 1 <= len(seen) <= direct.DELIVERY_THREADS
    assert all(len(fx.copies(f"u{i}")) == 1 for i in range(20))


async def test_when_the_users_cannot_be_read_the_message_is_queued(
    spool: Spool, tmp_path: Path
) -> None:
    fx = Fixture(spool, tmp_path / "mail")

    def broken() -> set[str]:
        raise OSError(13, "Permission denied")

    fx.door = DirectDoor(fx.queue, fx.agent, route, enabled=lambda: True, users=broken)
    qid, reported = await fx.commit("alice@example.org")
    assert not reported and fx.queued() == {qid: ["alice@example.org"]}
