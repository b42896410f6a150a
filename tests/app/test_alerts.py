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


async def test_the_notice_runs_in_the_spawned_task_and_its_failure_is_not_lost() -> None:
    config = configuration.load(None)

    class BrokenSink:
        def new_message(self) -> None:
            raise RuntimeError("the spool is gone")

    with pytest.raises(ExceptionGroup) as caught:
        async with asyncio.TaskGroup() as tasks:
            alerts = PostmasterAlerts(lambda: config, lambda: BrokenSink(),  # type: ignore[arg-type,return-value]
                                      tasks.create_task)
            alerts("subject", "text")
    assert caught.group_contains(RuntimeError, match="the spool is gone")
