"""The maillog handler: one write per event-loop turn for info lines, at once otherwise."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator

import pytest

from mailhaven import maillog


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


@pytest.fixture
def stream() -> Iterator[CountingStream]:
    out = CountingStream()
    maillog.setup("mx.example.org", "info", out)
    yield out
    logging.getLogger("mailhaven").handlers.clear()


async def test_info_lines_of_one_loop_turn_are_written_together(stream: CountingStream) -> None:
    log = logging.getLogger("mailhaven.queue")
    log.info("QID1: from=<a@example.org>, size=1, nrcpt=1 (queue active)")
    log.info("QID1: removed")
    assert stream.writes == []  # still in this turn
    await asyncio.sleep(0)
    assert len(stream.writes) == 1
    first, second = stream.getvalue().splitlines()
    pid = maillog.MaillogFormatter("x").pid
    assert first.endswith(
        f"mailhaven/qmgr[{pid}]: QID1: from=<a@example.org>, size=1, nrcpt=1 (queue active)"
    )
    assert second.endswith(": QID1: removed")


async def test_a_warning_is_written_at_once_after_what_is_pending(stream: CountingStream) -> None:
    log = logging.getLogger("mailhaven.smtpd")
    log.info("connect from unknown[127.0.0.1]")
    log.warning("unknown[127.0.0.1]: too many errors")
    assert len(stream.writes) == 1
    assert [line.split(": ", 1)[1] for line in stream.getvalue().splitlines()] == [
        "connect from unknown[127.0.0.1]", "warning: unknown[127.0.0.1]: too many errors",
    ]
    await asyncio.sleep(0)
    assert len(stream.writes) == 1  # the scheduled drain found nothing left


def test_outside_an_event_loop_every_line_is_written_at_once(stream: CountingStream) -> None:
    logging.getLogger("mailhaven.cli").info("one")
    logging.getLogger("mailhaven.cli").info("two")
    assert len(stream.writes) == 2


async def test_flush_at_exit_writes_what_is_pending(stream: CountingStream) -> None:
    logging.getLogger("mailhaven.queue").info("QID2: removed")
    for handler in logging.getLogger("mailhaven").handlers:
        handler.flush()  # what logging.shutdown() does at exit
    assert stream.getvalue().endswith(": QID2: removed\n")
