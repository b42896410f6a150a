"""Damaged or exposed spools (issue 16, item 23): a body file changed in place, even to the
same size, is quarantined instead of sent; a spool every user may read is not served."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from tests.fakes import FakeClock, put

from mailhaven.spool import Hold, Spool

BIG = b"Subject: big\r\n\r\n" + b"0123456789abcdef" * 1024  # over the 4 KiB inline limit


async def test_a_body_damaged_to_the_same_size_is_quarantined(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    qid = await put(spool, BIG, "bob@example.net")
    path = spool.bodies_dir / qid
    assert (await spool.load_to_send(qid)) is not None  # intact: loads
    data = bytearray(path.read_bytes())
    data[5000] ^= 0x20  # one flipped bit: same size, different bytes
    path.write_bytes(bytes(data))
    # a lookup (a notice, the log) does not read the body; an attempt to send it does
    assert await spool.load(qid) is not None and path.exists()
    with caplog.at_level(logging.WARNING, logger="mailhaven.spool"):
        assert await spool.load_to_send(qid) is None
    assert f"{qid}: quarantined: body file does not match its checksum" in caplog.text
    [state] = await spool.recipients(qid)
    assert state.hold & Hold.QUARANTINE and not state.active
    assert spool.quarantined_body(qid) is not None and not path.exists()
    assert await spool.due(2_000_000_000.0, 10) == []


async def test_an_intact_big_body_reads_back_whole(spool: Spool) -> None:
    qid = await put(spool, BIG, "bob@example.net")
    msg = await spool.load_to_send(qid)
    assert msg is not None and msg.body_crc is not None
    with msg.open() as f:
        assert f.read().endswith(BIG)


def test_a_world_readable_spool_is_refused(tmp_path: Path, clock: FakeClock) -> None:
    root = tmp_path / "spool"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    s = Spool(root, clock=clock)
    with pytest.raises(PermissionError, match=r"accessible to every user.*chmod o-rwx"):
        s.open()
    os.chmod(root, 0o700)
    s.open()
    s.close()
