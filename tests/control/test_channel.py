"""The control channel over a real unix socket, the queue lock, and the standard handlers."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from tests.fakes import put

from mailhaven.control.channel import ControlError, ControlServer, dispatch, request
from mailhaven.control.forwarding import Forwarding
from mailhaven.control.queue_admin import QueueAdmin
from mailhaven.proto.replies import Reply
from mailhaven.spool import Hold, RecipientUpdate, Spool, Status, list_queue
from mailhaven.spool.lock import DaemonLock, lock_path


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    async def flush(self, domain: str | None, ids: Sequence[str]) -> int:
        self.calls.append(("flush", (domain, list(ids))))
        return 7

    async def hold(self, ids: Sequence[str]) -> int:
        self.calls.append(("hold", list(ids)))
        return len(ids)

    async def release(self, ids: Sequence[str]) -> int:
        self.calls.append(("release", list(ids)))
        return len(ids)

    async def delete(self, ids: Sequence[str]) -> int:
        raise RuntimeError("boom")

    async def requeue(self, ids: Sequence[str]) -> int:
        self.calls.append(("requeue", list(ids)))
        return 1

    async def pickup(self) -> int:
        self.calls.append(("pickup", None))
        return 2

    async def etrn(self, client_ip: str, node: str) -> Reply:
        self.calls.append(("etrn", (client_ip, node)))
        return Reply(253, f"OK, 1 pending messages for node {node} started", "2.0.0")

    async def release_domains(self, domains: Sequence[str]) -> int:
        self.calls.append(("release_domains", list(domains)))
        return 3


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Path, Recorder]]:
    path = tmp_path / "control.sock"
    handlers = Recorder()
    server = ControlServer(path, handlers)
    await server.start()
    yield path, handlers
    await server.close()
    assert not path.exists()


async def ask(path: Path, obj: dict[str, object]) -> dict[str, object] | None:
    return await asyncio.to_thread(request, path, obj, 10.0)


async def test_round_trip_over_a_unix_socket(served: tuple[Path, Recorder]) -> None:
    path, handlers = served
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert await ask(path, {"cmd": "ping"}) == {"ok": True, "count": 0}
    assert await ask(path, {"cmd": "flush"}) == {"ok": True, "count": 7}
    assert await ask(path, {"cmd": "flush", "domain": "example.net"}) == {"ok": True, "count": 7}
    assert await ask(path, {"cmd": "hold", "ids": ["A1", "B2"]}) == {"ok": True, "count": 2}
    assert await ask(path, {"cmd": "pickup"}) == {"ok": True, "count": 2}
    assert handlers.calls == [
        ("flush", (None, [])),
        ("flush", ("example.net", [])),
        ("hold", ["A1", "B2"]),
        ("pickup", None),
    ]


async def test_bad_requests_and_failing_handlers_get_error_answers(
    served: tuple[Path, Recorder],
) -> None:
    path, handlers = served
    for bad in (
        {"cmd": "format-disk"},
        {"cmd": "hold"},
        {"cmd": "hold", "ids": ["../etc"]},
        {"cmd": "hold", "ids": "A1"},
        {"cmd": "flush", "domain": "a b"},
        {"cmd": "flush", "domain": "x.example", "ids": ["A1"]},
        {"nocmd": 1},
    ):
        answer = await ask(path, bad)
        assert answer is not None and answer["ok"] is False, bad
    answer = await ask(path, {"cmd": "delete", "ids": ["A1"]})
    assert answer == {"ok": False, "error": "internal error (see the daemon's log)"}
    assert await ask(path, {"cmd": "ping"}) == {"ok": True, "count": 0}  # still serving
    assert handlers.calls == []


async def test_several_requests_on_one_connection_and_junk(served: tuple[Path, Recorder]) -> None:
    path, _ = served

    def talk() -> list[bytes]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(path))
            s.sendall(b'{"cmd": "ping"}\nnot json\n{"cmd": "requeue", "ids": ["Q1"]}\n')
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            return data.splitlines()

    lines = await asyncio.to_thread(talk)
    assert lines == [
        b'{"ok": true, "count": 0}',
        b'{"ok": false, "error": "not a JSON line"}',
        b'{"ok": true, "count": 1}',
    ]


def test_no_daemon_means_none(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    assert request(path, {"cmd": "ping"}) is None
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    assert request(path, {"cmd": "ping"}) is None


def test_a_daemon_that_hangs_up_is_a_control_error(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)

        def hang_up() -> None:
            conn, _ = listener.accept()
            conn.close()

        thread = threading.Thread(target=hang_up)
        thread.start()
        try:
            with pytest.raises(ControlError):
                request(path, {"cmd": "ping"}, timeout=10.0)
        finally:
            thread.join(timeout=10)


async def test_start_replaces_a_stale_socket_but_not_a_live_one(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    first = ControlServer(path, Recorder())
    await first.start()
    try:
        with pytest.raises(OSError):
            await ControlServer(path, Recorder()).start()
        assert await ask(path, {"cmd": "ping"}) == {"ok": True, "count": 0}
    finally:
        await first.close()


def test_daemon_lock_is_exclusive(tmp_path: Path) -> None:
    path = lock_path(tmp_path / "spool")
    held = DaemonLock.acquire(path)
    assert held is not None
    assert DaemonLock.acquire(path) is None
    held.release()
    again = DaemonLock.acquire(path)
    assert again is not None
    again.release()


# ---------------------------------------------------------------------------- QueueAdmin


async def test_queue_admin_verbs(spool: Spool) -> None:
    wakes: list[int] = []
    picked: list[int] = []

    async def pickup() -> int:
        picked.append(1)
        return 3

    admin = QueueAdmin(spool, wake=lambda: wakes.append(1), pickup=pickup)
    a = await put(spool, b"a\r\n", "x@one.example")
    b = await put(spool, b"b\r\n", "y@two.example", "z@one.example")
    c = await put(spool, b"c\r\n", "w@three.example")
    later = 1_700_000_000.0 + 3600
    for qid in (a, b, c):
        await spool.record(qid, [RecipientUpdate(0, Status.DEFERRED, later, Reply(451, "x", "4.0.0"))])
    assert await dispatch(admin, {"cmd": "hold", "ids": [a, "NOSUCHID0000000"]}) == {
        "ok": True, "count": 1
    }
    held = {m.queue_id: m for m in list_queue(spool.root)}[a]
    assert all(r.hold & Hold.ADMIN for r in held.recipients)
    assert await admin.release([a]) == 1
    assert await admin.flush("ONE.example", []) == 2  # a and b have recipients there
    due = {r.queue_id for r in await spool.due(1_700_000_000.0, 10)}
    assert due == {a, b}
    assert await admin.requeue([c]) == 1
    assert await admin.flush(None, []) == 0  # nothing deferred into the future any more
    assert await admin.delete([c]) == 1
    assert await admin.pickup() == 3 and picked == [1]
    assert [m.queue_id for m in list_queue(spool.root)] == [a, b]
    # every verb that changed the queue told the scheduler (hold and delete too: it gives
    # back the new mail it holds in memory, so the change applies to that mail as well)
    assert len(wakes) == 6


async def test_every_flush_forgets_the_dead_destinations(spool: Spool) -> None:
    """Postfix's flush_dead: a flush of all, of a domain or of ids retries a destination that
    was down now, not after the dead-destination timer; the other verbs leave that state."""
    forgotten: list[int] = []
    admin = QueueAdmin(spool, forget_dead=lambda: forgotten.append(1))
    a = await put(spool, b"a\r\n", "x@one.example")
    await admin.flush(None, [])
    await admin.flush("one.example", [])
    await admin.flush(None, [a])
    assert len(forgotten) == 3
    await admin.hold([a])
    await admin.release([a])
    await admin.requeue([a])
    assert len(forgotten) == 3


async def test_etrn_is_forwarded_with_its_reply() -> None:
    """A worker process asks the daemon, which opens the release windows in every shard."""
    handlers = Recorder()
    answer = await dispatch(handlers, {"cmd": "etrn", "client": "127.0.0.9", "node": "@pt.test"})
    assert answer == {
        "ok": True,
        "count": 0,
        "reply": [253, "2.0.0", "OK, 1 pending messages for node @pt.test started"],
    }
    assert handlers.calls == [("etrn", ("127.0.0.9", "@pt.test"))]
    for bad in ({"client": "x y", "node": "pt.test"}, {"client": "127.0.0.9", "node": "a b"}):
        answer = await dispatch(handlers, {"cmd": "etrn", **bad})
        assert answer["ok"] is False


async def test_release_domains_is_checked_and_dispatched() -> None:
    handlers = Recorder()
    answer = await dispatch(handlers, {"cmd": "release_domains", "domains": ["pt.test"]})
    assert answer == {"ok": True, "count": 3}
    assert handlers.calls == [("release_domains", ["pt.test"])]
    for bad in ([], "pt.test", ["a b"], [7]):
        answer = await dispatch(handlers, {"cmd": "release_domains", "domains": bad})
        assert answer["ok"] is False, bad
    answer = await dispatch(QueueAdmin(Recorder()), {"cmd": "release_domains", "domains": ["x"]})  # type: ignore[arg-type]
    assert answer == {"ok": False, "error": "release_domains: no part-time hosts here"}


async def test_forwarding_adds_up_the_workers_counts(spool: Spool, tmp_path: Path) -> None:
    """The daemon's verbs reach each worker's socket; a silent worker counts 0, not an error."""
    qid = await put(spool, b"x\r\n", "a@one.example")
    worker_sock = tmp_path / "control-1.sock"
    worker = Recorder()
    server = ControlServer(worker_sock, worker)
    await server.start()
    try:
        silent = tmp_path / "control-2.sock"  # a worker that is restarting: nobody listens
        forwarding = Forwarding(QueueAdmin(spool), [worker_sock, silent])
        assert await forwarding.hold([qid, "OTHER"]) == 1 + 2
        assert await forwarding.release([qid]) == 1 + 1
        assert await forwarding.flush("one.example", []) == 1 + 7
        assert await forwarding.requeue([qid]) == 1 + 1
        assert await forwarding.pickup() == 0  # the daemon's alone
        assert worker.calls == [
            ("hold", [qid, "OTHER"]),
            ("release", [qid]),
            ("flush", ("one.example", [])),
            ("requeue", [qid]),
        ]
    finally:
        await server.close()
