"""spool.message_writer: the header-then-body stream each copy of a delivery reads."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from mailhaven.spool.message_writer import prefixed


@pytest.mark.parametrize("on_disk", [False, True])
def test_each_copy_reads_header_then_the_whole_body_and_leaves_it_open(
    tmp_path: Path, on_disk: bool
) -> None:
    content = b"Subject: x\r\n\r\n" + b"line\r\n" * 50_000  # more than one buffer
    if on_disk:
        (tmp_path / "body").write_bytes(content)
        body = open(tmp_path / "body", "rb")  # noqa: SIM115 - closed below
    else:
        body = io.BytesIO(content)
    try:
        for _ in range(2):  # a second copy starts from the body's start again
            with prefixed(b"Received: by mx\r\n", body) as stream:
                assert stream.read() == b"Received: by mx\r\n" + content
        assert not body.closed
    finally:
        body.close()
