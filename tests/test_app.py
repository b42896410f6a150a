"""The composition root's own arithmetic (everything else it wires is tested end to end)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailhaven import config as configuration
from mailhaven.app import App
from mailhaven.workers import WorkerRole


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
    app._build_engine()
    assert app.runner is not None
    limits = app.runner._limits
    assert (limits.max_deliveries, limits.per_destination) == expected
    assert app.spool.root.name == ("spool" if worker is None else f"spool-{worker.shard}")
