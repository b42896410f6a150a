"""Notices to the postmaster: queued in a task the caller's `spawn` starts, never waited for."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mailhaven import config as configuration
from mailhaven.app.alerts import PostmasterAlerts, notice


def test_a_notice_goes_from_the_mailer_daemon_to_the_postmaster(tmp_path: Path) -> None:
    config = configuration.load(None)
    envelope, data = notice(config, "limit hit", "bob sent too much\n")
    assert envelope.sender == "" and envelope.recipients[0].address.startswith("postmaster@")
    assert data.startswith(b"From: Mail Delivery System <MAILER-DAEMON@")
    assert data.endswith(b"\r\n\r\nbob sent too much\r\n")


async def test_a_notice_that_cannot_be_queued_is_logged_and_the_process_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The notice runs in the spawned task; a spool that fails it is logged with its traceback
    and does not end the task group (the mail server) it runs in."""
    config = configuration.load(None)

    class BrokenSink:
        def new_message(self) -> None:
            raise RuntimeError("the spool is gone")

    async with asyncio.TaskGroup() as tasks:
        alerts = PostmasterAlerts(lambda: config, lambda: BrokenSink(),  # type: ignore[arg-type,return-value]
                                  tasks.create_task)
        alerts("subject", "text")
    failures = [r for r in caplog.records if "cannot queue the notice" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None
    assert "the spool is gone" in str(failures[0].exc_info[1])
