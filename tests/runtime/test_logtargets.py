"""Log targets: syslog datagrams, JSON lines, a reopenable file, and the setting's syntax."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailhaven import maillog
from mailhaven.runtime import logtargets


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    yield
    logging.getLogger("mailhaven").handlers.clear()
    maillog._handler = None


def test_setting_syntax() -> None:
    assert logtargets.parse("stderr") == ("stderr", "")
    assert logtargets.parse("syslog") == ("syslog", "/dev/log")
    assert logtargets.parse("syslog:/run/x.sock") == ("syslog", "/run/x.sock")
    assert logtargets.parse("file:/var/log/mail.log") == ("file", "/var/log/mail.log")
    for bad in ("file:", "file:relative.log", "syslog:relative", "journal", "stderr:x"):
        with pytest.raises(logtargets.TargetError):
            logtargets.parse(bad)


def test_syslog_gets_one_datagram_per_line_with_the_mail_facility(tmp_path: Path) -> None:
    path = tmp_path / "log.sock"
    syslogd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslogd.bind(str(path))
    syslogd.settimeout(5)
    try:
        logtargets.setup("mx.example.org", target=f"syslog:{path}")
        smtpd = logging.getLogger("mailhaven.smtpd")
        maillog.info(smtpd, "connect from unknown[%s]", "127.0.0.1")  # the fast path
        smtpd.warning("unknown[127.0.0.1]: too many errors\r\nforged")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            smtpd.exception("internal error")
        got = [syslogd.recv(4096).decode() for _ in range(3)]
    finally:
        syslogd.close()
    info, warning, error = got
    # <22> = mail.info, <20> = mail.warning, <19> = mail.err; no host: syslogd adds its own
    assert info.startswith("<22>") and info.endswith(": connect from unknown[127.0.0.1]")
    assert " mailhaven/smtpd[" in info and "mx " not in info
    assert warning.startswith("<20>")
    assert warning.endswith(r"warning: unknown[127.0.0.1]: too many errors\x0d\x0aforged")
    assert error.startswith("<19>") and error.endswith("error: internal error")


def test_a_vanished_syslog_socket_loses_lines_but_never_raises(tmp_path: Path) -> None:
    logtargets.setup("mx.example.org", target=f"syslog:{tmp_path / 'none.sock'}")
    logging.getLogger("mailhaven.smtpd").warning("nobody listens")
    maillog.info(logging.getLogger("mailhaven.smtpd"), "still nobody")


def test_json_lines_parse_and_carry_the_queue_id(tmp_path: Path) -> None:
    path = tmp_path / "mail.json"
    logtargets.setup("mx.example.org", target=f"file:{path}", log_format="json")
    qmgr = logging.getLogger("mailhaven.queue")
    maillog.info(qmgr, "%s: from=<a@example.org>, size=1, nrcpt=1 (queue active)",
                 "0123456789ABCDE")
    qmgr.warning("line\nbreak")
    maillog.flush()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["level"] for line in lines] == ["info", "warning"]
    assert lines[0]["queue_id"] == "0123456789ABCDE"
    assert lines[0]["program"] == "mailhaven/qmgr" and lines[0]["host"] == "mx"
    assert lines[0]["text"].startswith("0123456789ABCDE: from=<a@example.org>")
    assert lines[1]["text"] == "line\nbreak" and "queue_id" not in lines[1]


def test_file_reopen_after_rename_loses_no_line(tmp_path: Path) -> None:
    path = tmp_path / "mail.log"
    logtargets.setup("mx.example.org", target=f"file:{path}")
    log = logging.getLogger("mailhaven.smtpd")
    log.warning("before rotation")
    path.rename(tmp_path / "mail.log.1")
    log.warning("between rename and reopen")  # still goes to the renamed file
    maillog.reopen()
    log.warning("after reopen")
    maillog.flush()
    assert (tmp_path / "mail.log.1").read_text().count("\n") == 2
    assert path.read_text().endswith("warning: after reopen\n")


def test_a_syslogd_that_stops_reading_costs_lines_not_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The socket's queue is short (net.unix.max_dgram_qlen); once it is full each line waits
    at most SYSLOG_SEND_TIMEOUT and is dropped, instead of blocking the event loop for good."""
    import socket
    import time

    monkeypatch.setattr(logtargets, "SYSLOG_SEND_TIMEOUT", 0.01)
    path = tmp_path / "log.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslogd:
        syslogd.bind(str(path))
        stream = logtargets.DatagramStream(str(path))
        started = time.monotonic()
        for i in range(200):  # nobody reads
            stream.write(f"line {i}\n")
        assert time.monotonic() - started < 10
        assert syslogd.recv(100) == b"line 0"
        stream.close()
