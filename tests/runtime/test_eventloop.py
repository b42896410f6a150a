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


def test_asyncio_is_the_default_loop() -> None:
    assert load(None).event_loop == "asyncio"
    assert eventloop.run("asyncio", _loop_package()) == "asyncio"


def test_uvloop_runs_the_coroutine_on_uvloop() -> None:
    pytest.importorskip("uvloop")
    assert eventloop.run("uvloop", _loop_package()) == "uvloop"


def test_uvloop_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    main = _loop_package()
    with pytest.raises(eventloop.LoopUnavailable, match=r"pip install 'mailhaven\[uvloop\]'"):
        eventloop.run("uvloop", main)
    assert main.cr_frame is None  # closed, not left to warn "never awaited"


def test_an_unknown_loop_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "mailhaven.toml"
    path.write_text('event_loop = "trio"\n')
    with pytest.raises(ConfigError, match="event_loop"):
        load(path)
