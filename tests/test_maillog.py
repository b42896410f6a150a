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


def _texts(stream: CountingStream) -> list[str]:
    """The lines without their time stamp (which may differ by a second)."""
    return [line.split(" ", 3)[3] for line in stream.getvalue().splitlines()]


def _only_ours() -> None:
    """Detach the capture handlers pytest adds for the test's call phase, so `mailhaven` has
    just our handler, as in the daemon."""
    root = logging.getLogger("mailhaven")
    for handler in list(root.handlers):
        if not isinstance(handler, maillog.BatchingHandler):
            root.removeHandler(handler)


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def test_the_fast_info_writes_what_logging_would(stream: CountingStream) -> None:
    _only_ours()
    log = logging.getLogger("mailhaven.queue")
    fmt = "%s: from=<%s>, size=%d, nrcpt=%d (queue active)"
    log.info(fmt, "QID3", "a@example.org", 5, 1)
    maillog.info(log, fmt, "QID3", "a@example.org", 5, 1)
    log.info("QID3: 100% done")  # no arguments: no % formatting, as logging does
    maillog.info(log, "QID3: 100% done")
    assert stream.writes == []  # batched like logging's info lines
    await asyncio.sleep(0)
    assert len(stream.writes) == 1
    first, second, third, fourth = _texts(stream)
    assert first == second
    assert first.endswith("]: QID3: from=<a@example.org>, size=5, nrcpt=1 (queue active)")
    assert third == fourth
    assert third.endswith("]: QID3: 100% done")


def test_the_fast_info_outside_an_event_loop_writes_at_once(stream: CountingStream) -> None:
    _only_ours()
    maillog.info(logging.getLogger("mailhaven.cli"), "one")
    assert len(stream.writes) == 1


async def test_the_fast_info_defers_to_logging_when_others_could_see_the_line(
    stream: CountingStream,
) -> None:
    _only_ours()
    log = logging.getLogger("mailhaven.smtpd")
    other = ListHandler()
    log.addHandler(other)  # a handler of the logger's own must get its records
    try:
        maillog.info(log, "connect from %s", "unknown[127.0.0.1]")
    finally:
        log.removeHandler(other)
    assert other.messages == ["connect from unknown[127.0.0.1]"]
    await asyncio.sleep(0)
    assert _texts(stream)[0].endswith("]: connect from unknown[127.0.0.1]")


async def test_the_fast_info_honours_the_level_and_bad_arguments(
    stream: CountingStream, capsys: pytest.CaptureFixture[str]
) -> None:
    _only_ours()
    root = logging.getLogger("mailhaven")
    root.setLevel(logging.WARNING)
    try:
        maillog.info(logging.getLogger("mailhaven.queue"), "QID4: removed")
    finally:
        root.setLevel(logging.INFO)
    maillog.info(logging.getLogger("mailhaven.queue"), "%s: %d", "QID5", "not a number")
    await asyncio.sleep(0)
    assert stream.getvalue() == ""  # neither line: one filtered, one reported by logging
    assert "not a number" in capsys.readouterr().err


async def test_the_fast_info_builds_no_log_record(
    stream: CountingStream, monkeypatch: pytest.MonkeyPatch
) -> None:
    _only_ours()

    def no_record(*args: object, **kwargs: object) -> logging.LogRecord:
        raise AssertionError("a LogRecord was built")

    monkeypatch.setattr(logging.Logger, "makeRecord", no_record)
    maillog.info(logging.getLogger("mailhaven.queue"), "%s: removed", "QID6")
    await asyncio.sleep(0)
    assert _texts(stream)[0].endswith("]: QID6: removed")


def test_control_characters_in_client_strings_cannot_forge_a_line(
    stream: CountingStream,
) -> None:
    # CR/LF (and every other non-printable) in text a client chose is escaped on both paths:
    # logging's (a warning) and the fast `info` path. Outside a loop: written at once.
    forged = "eve\r\nDec  4 12:00:00 mx mailhaven/smtpd[1]: forged\u2028x\x00"
    logging.getLogger("mailhaven.smtpd").warning("auth failed: user=%s", forged)
    maillog.info(logging.getLogger("mailhaven.smtpd"), "helo=<%s>", forged)
    logging.getLogger("mailhaven.smtpd").info("plain é ok")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3, lines
    escaped = r"eve\x0d\x0aDec  4 12:00:00 mx mailhaven/smtpd[1]: forged\u2028x\x00"
    assert lines[0].endswith(f"warning: auth failed: user={escaped}")
    assert lines[1].endswith(f"helo=<{escaped}>")
    assert lines[2].endswith("plain é ok")
