"""`event_loop`: the engine runs on the loop the configuration names, or says why it cannot."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from mailhaven.config import ConfigError, load
from mailhaven.runtime import eventloop


async def _loop_package() -> str:
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]


def test_uvloop_is_the_default_loop_and_asyncio_a_choice() -> None:
    assert load(None).event_loop == "uvloop"
    assert eventloop.run("asyncio", _loop_package()) == "asyncio"


def test_uvloop_runs_the_coroutine_on_uvloop() -> None:
    pytest.importorskip("uvloop")
    assert eventloop.run("uvloop", _loop_package()) == "uvloop"


def test_uvloop_missing_falls_back_to_asyncio_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    with caplog.at_level("WARNING", logger="mailhaven"):
        assert eventloop.run("uvloop", _loop_package()) == "asyncio"
    assert "uvloop cannot be imported" in caplog.text


def test_an_unknown_loop_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "mailhaven.toml"
    path.write_text('event_loop = "trio"\n')
    with pytest.raises(ConfigError, match="event_loop"):
        load(path)
