"""`mailhaven.faults`: the variable's syntax, the no-op default, and that the N-th hit after
`arm()` (not before it) kills the process with SIGKILL. The end-to-end use of every point is in
tests/e2e/test_crash_points.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from mailhaven import faults

PROBE = """
import sys
from mailhaven import faults
faults.crash_point("delivered")  # before arm(): start-up does not count
faults.arm()
for i in range(3):
    faults.crash_point("pickup_read")  # another point: ignored
    faults.crash_point("delivered")
    print("survived", i, flush=True)
"""


def run_probe(value: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    if value is not None:
        env[faults.ENV] = value
    return subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=30,
        check=False,
    )


def test_off_by_default() -> None:
    if faults.ENV not in os.environ:
        assert faults.crash_point is faults._nothing
    done = run_probe(None)
    assert done.returncode == 0 and done.stdout.count("survived") == 3


def test_the_nth_hit_after_arm_is_a_sigkill() -> None:
    done = run_probe("delivered:2")
    assert done.returncode == -signal.SIGKILL
    assert done.stdout.splitlines() == ["survived 0"]
    assert "crash injected at delivered" in done.stderr
    assert run_probe("delivered").stdout == ""


@pytest.mark.parametrize("value", ["nowhere", "delivered:0", "delivered:x", "delivered:-1"])
def test_bad_values_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match=faults.ENV):
        faults._parse(value)


def test_good_values() -> None:
    assert faults._parse("") is None
    assert faults._parse("body_synced") == ("body_synced", 1)
    assert faults._parse("after_commit:3") == ("after_commit", 3)
