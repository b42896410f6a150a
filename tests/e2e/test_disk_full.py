"""End to end: a full disk under the queue or the mailboxes (issue 16, items 18 and harness).

The state directory (or `mail/`) lives on a small tmpfs the test mounts (we run as root;
skipped where mounting is not allowed) and fills. Expected: `452 4.3.1` before the body (MAIL
FROM with SIZE=, or DATA) when free space is below `queue.minfree`, `452 4.3.1` after the body
when the disk fills while it streams in; never a 250 for mail not stored, never a traceback,
nothing half-written left in the spool, and normal service once space returns. A full Maildir
file system defers delivery (never bounces it).
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.e2e.conftest import ServerFactory
from tests.support.server import MailServer
from tests.support.small_fs import fill, small_tmpfs

from mailhaven.spool.salvage import check

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[Path]:
    # requested before `mail_server`, so it is unmounted after the server stopped
    with small_tmpfs(tmp_path / "fs", size=24 * MiB) as root:
        yield root


def _message(marker: str, size: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    body = line * (size // len(line) + 1)
    return f"Subject: {marker}\r\n\r\n".encode() + body


def _start(mail_server: ServerFactory, state: Path, minfree: int) -> MailServer:
    return mail_server(
        settings={
            "state_dir": str(state),
            "local_users": ["postmaster", "alice"],
            "limits": {"message_size": 4 * MiB},
            "queue": {"minfree": minfree, "minimal_backoff": 1.0, "maximal_backoff": 1.0},
        }
    )


def _assert_clean(server: MailServer) -> None:
    log = server.log()
    assert "Traceback" not in log, log
    assert "4.3.0" not in log, log
    assert list((server.state_dir / "spool" / "tmp").iterdir()) == []
    assert check(server.queue_db) is None  # the database came through intact


def test_below_minfree_refuses_at_mail_and_data(fs: Path, mail_server: ServerFactory) -> None:
    server = _start(mail_server, fs / "state", minfree=4 * MiB)
    filler = fs / "filler"
    fill(filler, leave=2 * MiB)
    with smtplib.SMTP(server.host, server.smtp_port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        code, text = smtp.mail("sender@client.test", ["SIZE=1000"])
        assert (code, text[:5]) == (452, b"4.3.1"), text
        assert smtp.rset()[0] == 250
        assert smtp.mail("sender@client.test")[0] == 250
        assert smtp.rcpt("alice@localhost")[0] == 250
        code, text = smtp.docmd("DATA")
        assert (code, text[:5]) == (452, b"4.3.1"), text
        assert smtp.rset()[0] == 250
    filler.unlink()
    with smtplib.SMTP(server.host, server.smtp_port, timeout=10) as smtp:
        smtp.sendmail("sender@client.test", ["alice@localhost"], _message("after", 4096))
    server.wait_for_messages("alice", 1)
    _assert_clean(server)
    assert server.log().count("452 4.3.1") == 2


def test_disk_filling_during_body_gives_452_then_recovers(
    fs: Path, mail_server: ServerFactory
) -> None:
    server = _start(mail_server, fs / "state", minfree=0)
    filler = fs / "filler"
    fill(filler, leave=512 * 1024)
    with smtplib.SMTP(server.host, server.smtp_port, timeout=10) as smtp:
        # no SIZE= (smtplib would send it): the space runs out while the body streams in
        smtp.ehlo("client.test")
        assert smtp.mail("sender@client.test")[0] == 250
        assert smtp.rcpt("alice@localhost")[0] == 250
        code, text = smtp.data(_message("big", 3 * MiB))
        assert (code, text[:5]) == (452, b"4.3.1"), text
        assert smtp.noop()[0] == 250  # the session goes on
    assert list((server.state_dir / "spool" / "bodies").iterdir()) == []
    assert server.messages("alice") == []
    filler.unlink()
    with smtplib.SMTP(server.host, server.smtp_port, timeout=10) as smtp:
        smtp.sendmail("sender@client.test", ["alice@localhost"], _message("big", 3 * MiB))
    server.wait_for_messages("alice", 1)
    _assert_clean(server)


def test_full_maildir_defers_and_delivers_later(fs: Path, mail_server: ServerFactory) -> None:
    mail = fs / "state" / "mail"
    with small_tmpfs(mail, size=1 * MiB):
        server = _start(mail_server, fs / "state", minfree=0)
        filler = mail / "filler"
        fill(filler)
        with smtplib.SMTP(server.host, server.smtp_port, timeout=10) as smtp:
            smtp.sendmail("sender@client.test", ["alice@localhost"], _message("later", 64 * 1024))
        deadline = time.monotonic() + 10
        while "status=deferred" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "status=deferred" in server.log(), server.log()
        assert "status=bounced" not in server.log()
        filler.unlink()
        server.wait_for_messages("alice", 1, timeout=15)
        server.stop()
    assert "status=bounced" not in server.log()
