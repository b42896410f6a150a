"""What the control socket reports about the process, and where the workers' sockets are."""

from __future__ import annotations

import os
from pathlib import Path

from mailhaven import config as configuration
from mailhaven.app.local_submission import about, worker_sockets


def test_about_says_who_where_and_since_when(tmp_path: Path) -> None:
    path = tmp_path / "mailhaven.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\nsmtp_processes = 3\n'
                    '[listen]\nsmtp = ["127.0.0.1:2525"]\nsubmission = []\n')
    config = configuration.load(path)
    facts = about(config, started=0.0, tls=None)
    assert facts["pid"] == os.getpid() and facts["config"] == str(path)
    assert facts["listeners"]["smtp"] == ["127.0.0.1:2525"] and "submission" not in facts["listeners"]
    assert facts["processes"] == 3 and facts["certificate"] is None and facts["uptime"] > 0
    assert worker_sockets(config) == [tmp_path / "state" / "control-1.sock",
                                      tmp_path / "state" / "control-2.sock"]
