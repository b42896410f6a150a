"""The shipped systemd unit is one systemd accepts (`systemd-analyze verify`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).parents[2] / "contrib" / "systemd" / "mailhaven.service"


def test_unit_verifies_and_matches_what_the_daemon_does(tmp_path: Path) -> None:
    text = UNIT.read_text()
    # What the daemon implements: the notify protocol and SIGHUP reload.
    assert "Type=notify" in text and "ExecReload=/bin/kill -HUP $MAINPID" in text
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart exists: point it at this checkout's entry point
    entry = Path(sys.executable).with_name("mailhaven")
    (tmp_path / UNIT.name).write_text(text.replace("/usr/local/bin/mailhaven", str(entry)))
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / UNIT.name)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "mailhaven.service" not in result.stderr, result.stderr  # no warnings about it


def test_socket_units_verify_and_name_the_listeners_they_replace(tmp_path: Path) -> None:
    """One socket unit per listener name (FileDescriptorName= names all sockets of a unit),
    each a name the daemon takes (`app.LISTENER_NAMES`) and each activating mailhaven.service."""
    from mailhaven.app.listeners import LISTENER_NAMES

    sockets = sorted(UNIT.parent.glob("mailhaven-*.socket"))
    assert [s.name for s in sockets] == [
        "mailhaven-pop3s.socket", "mailhaven-smtp.socket", "mailhaven-submission.socket",
        "mailhaven-submissions.socket",
    ]
    for unit in sockets:
        text = unit.read_text()
        name = unit.stem.removeprefix("mailhaven-")
        assert name in LISTENER_NAMES
        names = [line for line in text.splitlines() if line.startswith("FileDescriptorName=")]
        assert names == [f"FileDescriptorName={name}"]
        assert "Service=mailhaven.service\n" in text
        (tmp_path / unit.name).write_text(text)
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    entry = Path(sys.executable).with_name("mailhaven")
    (tmp_path / UNIT.name).write_text(
        UNIT.read_text().replace("/usr/local/bin/mailhaven", str(entry))
    )
    result = subprocess.run(
        [analyze, "verify", *(str(tmp_path / s.name) for s in sockets), str(tmp_path / UNIT.name)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "mailhaven" not in result.stderr, result.stderr  # no warning about any of them
