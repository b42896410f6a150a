"""Local delivery agent: end to end into Maildir with in-memory requests."""

from __future__ import annotations

import errno
import io
import os
import threading
from pathlib import Path
from typing import BinaryIO

import pytest
from tests.fakes import maildir_messages

from mailhaven.delivery import local as local_mod
from mailhaven.delivery.base import DeliveryAgent, DeliveryRequest
from mailhaven.delivery.local import LocalAgent, refuse_loops, trace_lines
from mailhaven.mailbox import maildir as md
from mailhaven.proto.envelope import Envelope, RecipientSpec
from mailhaven.routing.route import Route

BODY = b"Received: from x\r\nSubject: test\r\n\r\nHello\r\n.. dot\r\n"


def request(
    user: str,
    *rcpts: str,
    sender: str = "sender@remote.example",
    body: bytes = BODY,
    opener: object = None,
) -> DeliveryRequest:
    env = Envelope(sender=sender, recipients=tuple(RecipientSpec(r) for r in rcpts))

    def open_message() -> BinaryIO:
        return io.BytesIO(body)

    return DeliveryRequest(
        queue_id="4ABCDEF",
        envelope=env,
        recipients=rcpts,
        route=Route("local", user if "@" in user else f"{user}@example.org"),
        open_message=opener or open_message,  # type: ignore[arg-type]
        size=len(body),
    )


def messages(root: Path, user: str) -> list[bytes]:
    return maildir_messages(root / "example.org" / user)


def test_is_a_delivery_agent(tmp_path: Path) -> None:
    agent: DeliveryAgent = LocalAgent(tmp_path, "mx.example.org")
    assert agent is not None


async def test_delivers_with_trace_lines(tmp_path: Path) -> None:
    agent = LocalAgent(tmp_path / "mail", "mx.example.org")
    result = await agent.deliver(request("alice", "alice@example.org"))
    assert {k: v.one_line() for k, v in result.replies.items()} == {
        "alice@example.org": "250 2.0.0 delivered to maildir"
    }
    assert result.relay_host == "local" and result.notify_passed == frozenset()
    (stored,) = messages(tmp_path / "mail", "alice")
    assert stored == (
        b"Return-Path: <sender@remote.example>\nDelivered-To: alice@example.org\n"
        + BODY.replace(b"\r\n", b"\n")
    )
    (name,) = os.listdir(tmp_path / "mail" / "example.org" / "alice" / "new")
    assert md.parse_name(name)[1] == len(stored)


async def test_one_copy_per_recipient_each_with_its_delivered_to(tmp_path: Path) -> None:
    agent = LocalAgent(tmp_path, "mx")
    req = request("alice", "alice@example.org", "alice+news@example.net", "alice@example.org")
    result = (await agent.deliver(req)).replies
    assert list(result) == ["alice@example.org", "alice+news@example.net"]
    assert all(r.code == 250 for r in result.values())
    got = messages(tmp_path, "alice")
    assert len(got) == 2
    assert {m.split(b"\n")[1] for m in got} == {
        b"Delivered-To: alice@example.org",
        b"Delivered-To: alice+news@example.net",
    }


async def test_null_sender(tmp_path: Path) -> None:
    await LocalAgent(tmp_path, "mx").deliver(request("bob", "bob@x", sender=""))
    (stored,) = messages(tmp_path, "bob")
    assert stored.startswith(b"Return-Path: <>\n")


def test_trace_lines_cannot_inject_headers() -> None:
    assert trace_lines("a@b\r\nBcc: x", "c@d\n") == b"Return-Path: <a@bBcc: x>\nDelivered-To: c@d\n"


async def test_runs_off_the_event_loop(tmp_path: Path) -> None:
    seen: list[threading.Thread] = []

    def opener() -> BinaryIO:
        seen.append(threading.current_thread())
        return io.BytesIO(BODY)

    await LocalAgent(tmp_path, "mx").deliver(request("alice", "a@x", "b@x", opener=opener))
    assert len(seen) == 2
    assert all(t is not threading.main_thread() for t in seen)
    assert seen[0] is seen[1]  # one thread call for the group


@pytest.mark.parametrize("user", ["", "..", "a/b", "Alice", "x%y"])
async def test_invalid_user_is_permanent(tmp_path: Path, user: str) -> None:
    result = (await LocalAgent(tmp_path, "mx").deliver(request(user, "r@x"))).replies
    assert result["r@x"].code == 550 and result["r@x"].enhanced == "5.1.1"
    assert list(tmp_path.iterdir()) == []


async def test_vanished_user_is_permanent(tmp_path: Path) -> None:
    users = {"alice@example.org"}
    agent = LocalAgent(tmp_path, "mx", users=lambda: users)
    assert (await agent.deliver(request("alice", "alice@x"))).replies["alice@x"].code == 250
    users.clear()
    result = (await agent.deliver(request("alice", "alice@x"))).replies
    assert result["alice@x"].code == 550
    assert result["alice@x"].enhanced == "5.1.1"


@pytest.mark.parametrize(
    ("err", "code", "enhanced"),
    [
        (errno.EDQUOT, 452, "4.2.2"),
        (errno.ENOSPC, 452, "4.3.1"),
        (errno.EACCES, 451, "4.3.0"),
        (errno.EIO, 451, "4.3.0"),
    ],
)
async def test_io_errors_are_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int, code: int, enhanced: str
) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(err, os.strerror(err))

    md.ensure_maildir(tmp_path / "example.org" / "alice")
    monkeypatch.setattr(os, "fsync", failing_fsync)
    result = (await LocalAgent(tmp_path, "mx").deliver(request("alice", "alice@x"))).replies
    assert (result["alice@x"].code, result["alice@x"].enhanced) == (code, enhanced)
    assert os.listdir(tmp_path / "example.org" / "alice" / "new") == []
    assert os.listdir(tmp_path / "example.org" / "alice" / "tmp") == []


async def test_failed_fsync_of_a_new_maildir_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    agent = LocalAgent(tmp_path, "mx")
    monkeypatch.setattr(os, "fsync", failing_fsync)
    assert (await agent.deliver(request("alice", "alice@x"))).replies["alice@x"].code == 451
    assert not (tmp_path / "example.org" / "alice").exists()  # undone, so the retry fsyncs it again
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert (await agent.deliver(request("alice", "alice@x"))).replies["alice@x"].code == 250


async def test_unreadable_mail_root_is_temporary(tmp_path: Path) -> None:
    root = tmp_path / "file-not-dir"
    root.write_bytes(b"")
    result = (await LocalAgent(root, "mx").deliver(request("alice", "alice@x"))).replies
    assert result["alice@x"].is_temporary


async def test_unexpected_error_is_temporary(tmp_path: Path) -> None:
    def broken() -> BinaryIO:
        raise RuntimeError("spool corrupt")

    result = (await LocalAgent(tmp_path, "mx").deliver(request("alice", "alice@x", opener=broken))).replies
    assert result["alice@x"].code == 451


def file_opener(tmp_path: Path, body: bytes) -> object:
    """A message read from a file (a spilled body), not held in memory: the streamed path."""
    path = tmp_path / "spilled-body"
    path.write_bytes(body)
    return lambda: io.BufferedReader(open(path, "rb", buffering=0))


@pytest.mark.parametrize("source", ["memory", "file"])
async def test_forwarding_loop_is_refused(tmp_path: Path, source: str) -> None:
    looped = b"Delivered-To: Alice@Example.org\r\n" + BODY
    agent = LocalAgent(tmp_path, "mx")
    opener = file_opener(tmp_path, looped) if source == "file" else None
    result = (await agent.deliver(
        request("alice", "alice@example.org", "alice+x@example.org", body=looped, opener=opener)
    )).replies
    assert result["alice@example.org"].code == 554
    assert result["alice@example.org"].enhanced == "5.4.6"
    assert result["alice+x@example.org"].code == 250
    assert len(messages(tmp_path, "alice")) == 1
    assert os.listdir(tmp_path / "example.org" / "alice" / "tmp") == []


def test_loop_check_looks_only_at_the_header_and_any_chunking() -> None:
    in_body = b"Subject: x\r\n\r\nDelivered-To: a@b\r\n"
    assert b"".join(refuse_loops([in_body], "a@b")) == in_body
    in_header = b"X: y\r\nDelivered-To: <a@b>\r\n\r\nbody"
    for size in (1, 2, 3, 5, len(in_header)):
        chunks = [in_header[i : i + size] for i in range(0, len(in_header), size)]
        with pytest.raises(local_mod.ForwardingLoop):
            b"".join(refuse_loops(chunks, "A@B"))
    no_body = b"Delivered-To: a@b"
    with pytest.raises(local_mod.ForwardingLoop):
        b"".join(refuse_loops([no_body], "a@b"))


def test_whole_message_loop_check_agrees_with_the_streamed_one() -> None:
    for message, looped in [
        (b"Subject: x\r\n\r\nDelivered-To: a@b\r\n", False),
        (b"X: y\r\nDelivered-To: <A@b>\r\n\r\nbody", True),
        (b"Delivered-To: a@b", True),
        (b"X: y\nDelivered-To: a@b\n\nbody", True),
        (b"Delivered-To: other@b\r\n\r\n", False),
    ]:
        streamed = False
        try:
            b"".join(refuse_loops([message], "a@b"))
        except local_mod.ForwardingLoop:
            streamed = True
        assert streamed is looped
        if looped:
            with pytest.raises(local_mod.ForwardingLoop):
                local_mod.check_loop(message, "a@b")
        else:
            local_mod.check_loop(message, "a@b")


def test_whole_message_loop_check_is_bounded() -> None:
    late = b"X: " + b"y" * local_mod.HEADER_SCAN_LIMIT + b"\r\nDelivered-To: a@b\r\n\r\n"
    local_mod.check_loop(late, "a@b")  # past the limit: not looked at


@pytest.mark.parametrize("size", [10, 200_000])
async def test_memory_and_file_sources_store_the_same_bytes(tmp_path: Path, size: int) -> None:
    body = b"Subject: s\r\n\r\n" + (b"x" * 60 + b"\r\n") * (size // 62) + b"end\r"
    agent = LocalAgent(tmp_path, "mx")
    for opener in (None, file_opener(tmp_path, body)):
        result = (await agent.deliver(request("alice", "alice@example.org", body=body,
                                              opener=opener))).replies
        assert result["alice@example.org"].code == 250
    memory, spilled = (tmp_path / "example.org" / "alice" / "new").iterdir()
    assert memory.read_bytes() == spilled.read_bytes()
    assert md.parse_name(memory.name)[1:3] == md.parse_name(spilled.name)[1:3]
