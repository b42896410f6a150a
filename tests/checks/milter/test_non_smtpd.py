"""Milters for locally submitted mail (`non_smtpd`): the pickup's door shows each message to
the milters (as from localhost [127.0.0.1]) before intake, over a real loopback TestMilter."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from tests.support import milter as tm
from tests.support.milter import TestMilter

from mailhaven.checks.milter.non_smtpd import MilteredDoor
from mailhaven.checks.milter.settings import MilterSettings, parse_endpoint, spam_header_rules
from mailhaven.intake.cleanup import MILTER_HOLD, Outcome, Queued, Refused
from mailhaven.mailbox.folders import SPAM_FLAG
from mailhaven.pickup.collector import BodyWriter
from mailhaven.proto.envelope import Envelope, RecipientSpec
from mailhaven.proto.replies import Reply
from mailhaven.spool.message_writer import MessageWriter

MESSAGE = b"From: cron@example.org\r\nSubject: report\r\n\r\nall fine\r\n"
ENVELOPE = Envelope("cron@example.org", (RecipientSpec("root@example.org"),), protocol="local",
                    extra={"uid": "0", "origin": "pickup"})


class FakeDoor:
    """Intake stand-in: keeps what it was given."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.submitted: list[tuple[bytes, Envelope]] = []
        self.writers: list[MessageWriter] = []

    def new_message(self) -> BodyWriter:
        w = MessageWriter(f"QID{len(self.writers)}", self.tmp, 1 << 16)
        self.writers.append(w)
        return w

    async def submit(self, writer: BodyWriter, envelope: Envelope) -> Outcome:
        assert isinstance(writer, MessageWriter)
        with writer.read_back() as stream:
            self.submitted.append((stream.read(), envelope))
        return Queued(writer.queue_id, Reply(250, "ok", "2.0.0"))


def door_for(tmp: Path, *milters: TestMilter, **kw: object) -> tuple[MilteredDoor, FakeDoor]:
    inner = FakeDoor(tmp)
    settings = MilterSettings(
        endpoints=tuple(parse_endpoint(x.spec) for x in milters),
        **{"connect_timeout": 2.0, "command_timeout": 2.0, "content_timeout": 2.0,
           "daemon_name": "non_smtpd", "hostname": "mx.test", **kw},  # type: ignore[arg-type]
    )
    return MilteredDoor(inner, lambda: settings), inner


async def submit(door: MilteredDoor, envelope: Envelope = ENVELOPE) -> Outcome:
    writer = door.new_message()
    writer.write(MESSAGE)
    return await door.submit(writer, envelope)


async def test_no_milters_passes_straight_through(tmp_path: Path) -> None:
    inner = FakeDoor(tmp_path)
    door = MilteredDoor(inner, lambda: None)
    assert isinstance(await submit(door), Queued)
    assert inner.submitted == [(MESSAGE, ENVELOPE)]


async def test_milter_sees_a_local_session_and_its_edits_are_queued(
    tmp_path: Path, milter: TestMilter
) -> None:
    milter.replies["E"] = [tm.add_header("X-Scanned", "outbound"), tm.cont()]
    door, inner = door_for(tmp_path, milter)
    outcome = await submit(door)
    assert isinstance(outcome, Queued)
    ((data, envelope),) = inner.submitted
    assert data.endswith(b"X-Scanned: outbound\r\n\r\nall fine\r\n")
    assert envelope == ENVELOPE
    assert milter.seen("C")[0].startswith(b"localhost\x004")  # family '4'
    assert b"127.0.0.1" in milter.seen("C")[0]
    assert milter.seen("H") == [b"localhost\0"]
    assert milter.seen("M") == [b"<cron@example.org>\0"]
    assert milter.seen("R") == [b"<root@example.org>\0"]
    macros = b"".join(milter.seen("D"))
    assert b"{daemon_name}\0pickup\0" in macros and b"i\0QID0\0" in macros
    assert len(milter.wait_seen("Q", 1)) == 1  # each message its own milter session


@pytest.mark.parametrize(
    ("stage", "packet", "code"),
    [
        ("E", tm.replycode("550 5.7.1 outbound spam"), 550),
        ("R", tm.replycode("550 5.7.1 not to root"), 550),
        ("M", tm.tempfail(), 451),
        ("C", tm.reject(), 550),
    ],
)
async def test_refusals_reach_the_pickup(
    tmp_path: Path, milter: TestMilter, stage: str, packet: bytes, code: int
) -> None:
    milter.replies[stage] = [packet]
    door, inner = door_for(tmp_path, milter)
    outcome = await submit(door)
    assert isinstance(outcome, Refused) and outcome.reply.code == code
    assert inner.submitted == []


async def test_a_dead_milter_gets_the_default_action(tmp_path: Path) -> None:
    with TestMilter() as gone:
        dead = cast(TestMilter, SimpleNamespace(spec=gone.spec))
    # closed: nothing listens on that port any more
    door, inner = door_for(tmp_path, dead)
    outcome = await submit(door)
    assert isinstance(outcome, Refused) and outcome.reply.code == 451
    door, inner = door_for(tmp_path, dead, default_action="accept")
    assert isinstance(await submit(door), Queued) and len(inner.submitted) == 1


async def test_discard_drops_the_message_as_done(tmp_path: Path, milter: TestMilter) -> None:
    milter.replies["E"] = [tm.discard()]
    door, inner = door_for(tmp_path, milter)
    outcome = await submit(door)
    assert isinstance(outcome, Queued) and inner.submitted == []


async def test_envelope_edits_and_spam_marks(tmp_path: Path, milter: TestMilter) -> None:
    milter.replies["E"] = [tm.add_rcpt("abuse@example.org"), tm.add_header("X-Spam", "Yes"),
                           tm.quarantine("looks bad"), tm.cont()]
    door, inner = door_for(tmp_path, milter, quarantine="hold",
                           spam_headers=spam_header_rules(("X-Spam: Yes",)))
    assert isinstance(await submit(door), Queued)
    ((_, envelope),) = inner.submitted
    assert [r.address for r in envelope.recipients] == ["root@example.org", "abuse@example.org"]
    assert envelope.extra[MILTER_HOLD] == "looks bad" and envelope.extra[SPAM_FLAG] == "yes"


async def test_an_unexpected_error_frees_the_message(
    tmp_path: Path, milter: TestMilter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug past the protocol (here: reading the message back fails) propagates to the
    pickup, which logs it and keeps the drop file; the spool writer is not left behind."""
    door, inner = door_for(tmp_path, milter)
    writer = door.new_message()
    writer.write(MESSAGE)
    assert isinstance(writer, MessageWriter)

    def broken() -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(writer, "read_back", broken)
    with pytest.raises(OSError):
        await door.submit(writer, ENVELOPE)
    assert writer._closed  # aborted
    assert inner.submitted == []
