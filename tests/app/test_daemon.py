"""The composition root's own arithmetic (everything else it wires is tested end to end)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mailhaven import config as configuration
from mailhaven.app import App
from mailhaven.runtime.workers import WorkerRole


@pytest.mark.parametrize(
    ("processes", "worker", "expected"),
    [(1, None, (10, 5)), (2, None, (5, 3)), (3, WorkerRole(2, ()), (4, 2))],
)
async def test_queue_limits_are_divided_among_the_processes(
    tmp_path: Path, processes: int, worker: WorkerRole | None, expected: tuple[int, int]
) -> None:
    """A remote host sees at most `destination_concurrency` connections from all processes
    together (each gets its share, rounded up)."""
    path = tmp_path / "mailhaven.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\nsmtp_processes = {processes}\n'
        "[queue]\nconcurrency = 10\ndestination_concurrency = 5\n"
    )
    app = App(configuration.load(path), worker=worker)
    engine = app._build_engine()
    limits = engine.runner._limits
    assert (limits.max_deliveries, limits.per_destination) == expected
    assert app.spool.root.name == ("spool" if worker is None else f"spool-{worker.shard}")


async def test_the_mx_profile_is_built_once_per_configuration(tmp_path: Path) -> None:
    """Built once, not per connection; SIGHUP (`reload`) makes the next connection use the
    new settings."""
    path = tmp_path / "mailhaven.toml"
    conf = f'state_dir = "{tmp_path / "state"}"\n[limits]\nmessage_size = %d\n'
    path.write_text(conf % 100_000)
    app = App(configuration.load(path))
    first = app.front.profiles.mx()
    assert app.front.profiles.mx() is first
    assert first.settings.max_message_size == 100_000
    path.write_text(conf % 200_000)
    app.reload()
    assert app.front.profiles.mx().settings.max_message_size == 200_000


async def test_reload_changes_the_login_limits_and_keeps_the_counts(tmp_path: Path) -> None:
    """[limits] auth_* apply to the one limiter SMTP AUTH and POP3 share; its counts so far
    survive a reload (a SIGHUP must not give a guesser a fresh start)."""
    path = tmp_path / "mailhaven.toml"
    conf = (
        f'state_dir = "{tmp_path / "state"}"\n[limits]\n'
        "auth_failures = %d\nauth_address_failures = 50\nauth_failure_delay = %s\n"
    )
    path.write_text(conf % (3, "0.5"))
    app = App(configuration.load(path))
    limiter = app.front.limiter
    assert (limiter.max_failures, limiter.max_address_failures) == (3, 50)
    for t in range(2):
        limiter.failed("192.0.2.1", "alice", float(t))
    assert limiter.penalty("192.0.2.1", 2.0) == 1.0
    path.write_text(conf % (2, "0.25"))
    app.reload()
    assert app.front.limiter is limiter and app.front.authenticator.limiter is limiter
    assert limiter.failure_delay == 0.25 and limiter.penalty("192.0.2.1", 2.0) == 0.5
    assert not limiter.check("192.0.2.1", "alice", 2.0).allowed  # the two failures were kept


async def test_a_sighup_while_starting_waits_for_the_start(tmp_path: Path) -> None:
    """The handlers are in place before the listeners open; a SIGHUP that comes while the
    process starts (workers spawning, a client already connected) is applied after the start,
    not to half-built state and never by the default action, which would end the process."""
    path = tmp_path / "mailhaven.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    app = App(configuration.load(path))
    reloads: list[int] = []
    app.reload = lambda: reloads.append(1)  # type: ignore[method-assign]
    app._reload_signalled()
    assert reloads == [] and app._reload_pending
    app._up = True
    app._reload_signalled()
    assert reloads == [1]


async def test_a_task_that_fails_stops_the_process(tmp_path: Path) -> None:
    """Every task lives in the process's TaskGroup (`_spawn`): one that fails unexpectedly ends
    `run()` with its error (systemd restarts us) instead of vanishing. (A postmaster notice that
    cannot be queued is logged instead: tests/app/test_alerts.py.)"""
    path = tmp_path / "mailhaven.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    app = App(configuration.load(path))

    async def broken() -> None:
        raise RuntimeError("the spool is gone")

    async def start() -> None:
        app._spawn(broken())

    app.start = start  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="the spool is gone"):
        await asyncio.wait_for(app.run(), 10)
