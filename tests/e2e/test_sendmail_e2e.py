"""End to end: `mailhaven sendmail` (the command local programs call as `sendmail`) into a real
`mailhaven serve` process, through the drop directory and the pickup, to the Maildir.

The command runs as a subprocess, the way cron or PHP's mail() run it, and finds the server's
configuration through `-C <file>` or `$MAILHAVEN_CONFIG`; it runs in the server's directory,
because the config's `state_dir` is relative. Shown: `printf 'Subject: hi\\n\\nbody\\n' |
mailhaven sendmail -t -i` delivers (the daemon is poked over its control socket); with the daemon
stopped it still exits 0 and the message is delivered once the daemon starts (pickup at
start-up); a `-bs` SMTP session driven by `swaks --pipe` is delivered; `sendmail` started
under that name (a symlink) behaves the same; `-bp` lists the queue (as `mailhaven mailq` and
`mailhaven queue list` do) and `-q` flushes it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from tests.e2e.conftest import ServerFactory
from tests.support.server import MailServer, queue_id_of, split_trace

pytestmark = pytest.mark.e2e

USERS = ["postmaster", "alice", "bob"]


def mailhaven_exe() -> str:
    exe = Path(sys.executable).parent / "mailhaven"
    found = str(exe) if exe.exists() else shutil.which("mailhaven")
    if found is None:
        pytest.skip("the mailhaven console script is not installed")
    return found


def sendmail(
    server: MailServer,
    *args: str,
    stdin: bytes,
    via_env: bool = False,
    command: list[str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run `mailhaven sendmail ARGS` (or `command`) in the server's directory."""
    env = dict(os.environ)
    env.pop("MAILHAVEN_CONFIG", None)
    config: list[str] = []
    if via_env:
        env["MAILHAVEN_CONFIG"] = str(server.config_path)
    else:
        config = ["-C", str(server.config_path)]
    argv = command or [mailhaven_exe(), "sendmail"]
    return subprocess.run(
        [*argv, *config, *args],
        input=stdin,
        cwd=server.dir,
        env=env,
        capture_output=True,
        timeout=30,
        check=False,
    )


def marker() -> str:
    return uuid.uuid4().hex



def drop_files(server: MailServer) -> list[Path]:
    new = server.state_dir / "maildrop" / "new"
    return sorted(new.iterdir()) if new.exists() else []


def check_local_submission(data: bytes, *, to: str) -> bytes:
    """Our trace for local mail (no client, no HELO) and the fix-ups; returns the rest."""
    (return_path, delivered_to, received), rest = split_trace(data)
    assert return_path.startswith(b"Return-Path: <"), return_path
    assert delivered_to == f"Delivered-To: {to}".encode()
    assert re.fullmatch(
        rb"Received: by mx\.test \(mailhaven\) id [A-Za-z0-9]+(?: for <"
        + re.escape(to.encode())
        + rb">)?; .+",  # `for` only with one envelope recipient
        received,
    ), received
    head = rest.split(b"\n\n", 1)[0]
    # sendmail added From:, Date: and Message-ID:, once each (Postfix's local cleanup)
    assert re.search(rb"^From: .*<\S+@localhost>$", head, re.M), head
    assert len(re.findall(rb"^Date: ", head, re.M)) == 1, head
    assert len(re.findall(rb"^Message-ID: <[^>]+@mx\.test>$", head, re.M)) == 1, head
    return rest


def test_sendmail_t_i_delivers_to_the_maildir(mail_server: ServerFactory) -> None:
    server = mail_server(settings={"local_users": USERS})
    mark = marker()
    text = f"To: Alice <alice@localhost>\nBcc: bob@localhost\nSubject: hi {mark}\n\nbody\n.\nend\n"
    started = time.monotonic()
    done = sendmail(server, "-t", "-i", stdin=text.encode())
    assert done.returncode == 0, done.stderr
    assert done.stdout == b""
    data = server.wait_for_mark("alice", mark)
    elapsed = time.monotonic() - started
    rest = check_local_submission(data, to="alice@localhost")
    # -i: the lone "." is data; LF in, LF in the Maildir; Bcc removed, its recipient served
    assert rest.endswith(b"\n\nbody\n.\nend\n"), rest
    assert b"Bcc:" not in data
    bcc = server.wait_for_mark("bob", mark)
    assert b"Bcc:" not in bcc
    # the pickup was poked over the control socket: no waiting for its 5-second poll
    assert elapsed < 4.5, elapsed
    qid = queue_id_of(data)
    server.wait_for_log(rf"{qid}: uid=\d+ from=<\S+@localhost>")
    assert drop_files(server) == []


def test_sendmail_queues_while_the_daemon_is_down(mail_server: ServerFactory) -> None:
    server = mail_server(settings={"local_users": USERS})
    server.stop()
    mark = marker()
    done = sendmail(
        server, "-t", "-i", stdin=f"To: bob@localhost\nSubject: hi {mark}\n\nbody\n".encode(),
        via_env=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr  # durable in the drop directory
    [dropped] = drop_files(server)
    assert mark.encode() in dropped.read_bytes()
    assert dropped.stat().st_mode & 0o077 == 0
    assert not any(mark.encode() in p.read_bytes() for p in server.messages("bob"))
    # mailq says the mail system is down and lists what waits in the maildrop (Postfix)
    listed = subprocess.run(
        [mailhaven_exe(), "mailq", "-c", str(server.config_path)],
        cwd=server.dir, capture_output=True, text=True, timeout=30, check=False,
    )
    assert listed.returncode == 0, listed.stderr
    assert "Mail system is down" in listed.stderr
    assert dropped.name in listed.stdout and "bob@localhost" in listed.stdout
    waited = 1.5
    time.sleep(waited)  # the daemon comes up later: delay= includes the wait in the maildrop
    server.start()  # the pickup collects at start-up
    check_local_submission(server.wait_for_mark("bob", mark), to="bob@localhost")
    [line] = server.wait_for_log(r"to=<bob@localhost>, .*delay=(?P<delay>[0-9.]+), ")
    assert float(line["delay"]) >= waited
    deadline = time.monotonic() + 10
    while drop_files(server):
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.02)


def test_printf_pipe_into_sendmail_with_an_argv_recipient(mail_server: ServerFactory) -> None:
    """The issue's one-liner, with the recipient on the command line (no To: at all)."""
    server = mail_server(settings={"local_users": USERS})
    done = subprocess.run(
        f"printf 'Subject: hi\\n\\nbody\\n' | {mailhaven_exe()} sendmail -C"
        f" {server.config_path} -i alice",
        shell=True,
        cwd=server.dir,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    [path] = server.wait_for_messages("alice", 1)
    rest = check_local_submission(path.read_bytes(), to="alice@localhost")
    assert rest.startswith(b"Subject: hi\n") and rest.endswith(b"\n\nbody\n"), rest


def test_sendmail_bs_session_with_swaks_pipe_is_delivered(
    mail_server: ServerFactory, swaks: str
) -> None:
    server = mail_server(settings={"local_users": USERS})
    mark = marker()
    pipe = f"{mailhaven_exe()} sendmail -C {server.config_path} -bs"
    done = subprocess.run(
        [swaks, "--pipe", pipe, "--to", "alice@localhost,bob@localhost",
         "--from", "bob@localhost", "--header", f"Subject: via swaks {mark}"],
        cwd=server.dir, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"<-  250 2\.0\.0 Ok: queued as \S+", done.stdout), done.stdout
    for user in ("alice", "bob"):
        data = server.wait_for_mark(user, mark)
        assert b"Return-Path: <bob@localhost>" in data
        assert b"X-Mailer: swaks" in data
        assert data.count(b"\nDate: ") == 1  # swaks sent one; none added


def test_sendmail_symlink_mailq_and_flush(mail_server: ServerFactory, tmp_path: Path) -> None:
    """`sendmail` as a symlink to the `mailhaven` program; `-bp` shows a deferred message,
    `-q` asks the running daemon to flush."""
    # remote.example's next hop is a closed loopback port: its mail stays deferred
    server = mail_server(
        settings={
            "local_users": USERS,
            "relay": {"transport": {"remote.example": "[127.0.0.1]:9"}},
        }
    )
    link = tmp_path / "bin" / "sendmail"
    link.parent.mkdir()
    link.symlink_to(mailhaven_exe())
    mark = marker()
    done = sendmail(
        server, "-f", "alice@localhost", "far@remote.example",
        stdin=f"Subject: far {mark}\n\nbody\n".encode(), command=[str(link)],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    match = server.wait_for_log(r"(\w+): to=<far@remote\.example>, .* status=deferred")[0]
    qid = match.group(1)
    listing = sendmail(server, "-bp", stdin=b"", command=[str(link)])
    assert listing.returncode == 0, listing.stderr
    text = listing.stdout.decode()
    assert re.search(rf"^{qid}\s+\d+ .* alice@localhost$", text, re.M), text
    assert re.search(r"^\s+far@remote\.example$", text, re.M), text
    # the same listing from `mailhaven mailq -c FILE` and `mailhaven queue -c FILE list`
    config = str(server.config_path)
    for words in (["mailq", "-c", config], ["queue", "-c", config, "list"]):
        shown = subprocess.run(
            [mailhaven_exe(), *words],
            cwd=server.dir,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert shown.returncode == 0, shown.stderr
        assert re.search(rf"^{qid}\s", shown.stdout, re.M), shown.stdout
    flushed = sendmail(server, "-q", stdin=b"", command=[str(link)])
    assert flushed.returncode == 0, flushed.stderr
    server.wait_for_log(rf"{qid}: to=<far@remote\.example>, .* status=deferred", count=2)
