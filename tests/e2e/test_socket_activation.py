"""systemd socket activation against a real `mailhaven serve`: started the way systemd starts it
(the listening sockets as fds 3 and up, `LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID` = the
service's own PID), it serves those sockets by name instead of binding `[listen]`."""

from __future__ import annotations

import fcntl
import os
import poplib
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.support.server import free_port, port_listening, terminate

pytestmark = pytest.mark.e2e


def test_serves_the_sockets_systemd_passes_by_their_names(tmp_path: Path) -> None:
    configured = {name: free_port() for name in ("smtp", "pop3")}
    passed = {name: socket.create_server(("127.0.0.1", 0)) for name in ("smtp", "pop3")}
    config = tmp_path / "mailhaven.toml"
    config.write_text(f"""\
hostname = "mx.test"
state_dir = "{tmp_path / 'state'}"
[listen]
smtp = ["127.0.0.1:{configured['smtp']}"]
submission = []
submissions = []
pop3 = ["127.0.0.1:{configured['pop3']}"]
pop3s = []
[relay]
nameservers = ["127.0.0.1:{free_port()}"]
""")
    # Out of the way of fds 3 and 4, which the shell's redirections fill.
    fds = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD, 10) for s in passed.values()]
    script = f'LISTEN_PID=$$ exec "$0" -m mailhaven serve -c "$1" 3<&{fds[0]} 4<&{fds[1]}'
    env = dict(os.environ, LISTEN_FDS="2", LISTEN_FDNAMES="smtp:pop3", PYTHONUNBUFFERED="1")
    log = tmp_path / "mailhaven.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            ["bash", "-c", script, sys.executable, str(config)], env=env, pass_fds=fds,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
        )
    for fd in fds:
        os.close(fd)
    smtp_port = passed["smtp"].getsockname()[1]
    pop3_port = passed["pop3"].getsockname()[1]
    try:
        deadline = time.monotonic() + 30
        while b"pop3 listening" not in log.read_bytes():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as client:
            assert client.ehlo()[0] == 250
            client.sendmail("a@example.org", ["postmaster@localhost"], b"Subject: x\r\n\r\nhi\r\n")
        pop = poplib.POP3("127.0.0.1", pop3_port, timeout=10)
        assert pop.getwelcome().startswith(b"+OK")
        pop.quit()
        # The [listen] addresses of those names were not bound.
        assert not port_listening(configured["smtp"])
        assert not port_listening(configured["pop3"])
    finally:
        terminate(proc, 30)
        for sock in passed.values():
            sock.close()
    text = log.read_text()
    assert proc.returncode == 0, text
    assert f"smtp listening on 127.0.0.1:{smtp_port} (from systemd)" in text
    assert f"pop3 listening on 127.0.0.1:{pop3_port} (from systemd)" in text


def test_inherited_sockets_replace_their_name_unnamed_is_smtp_unknown_closed(
    tmp_path: Path,
) -> None:
    from mailhaven.app.listeners import bind_listeners
    from mailhaven.config import Config, Listen

    submission = free_port()
    config = Config(
        state_dir=str(tmp_path / "state"),
        listen=Listen(
            smtp=(f"127.0.0.1:{free_port()}",), submission=(f"127.0.0.1:{submission}",),
            submissions=(), pop3=(), pop3s=(),
        ),
    )
    unnamed, pop3, unknown = (socket.create_server(("127.0.0.1", 0)) for _ in range(3))
    bound = bind_listeners(config, [("", unnamed), ("pop3", pop3), ("imap", unknown)])
    try:
        assert {name: [s for _, s in socks] for name, socks in bound.items()} == {
            "smtp": [unnamed], "pop3": [pop3], "submission": [bound["submission"][0][1]],
        }
        assert bound["submission"][0][1].getsockname() == ("127.0.0.1", submission)
        assert unknown.fileno() == -1  # closed, not leaked
    finally:
        for socks in bound.values():
            for _, sock in socks:
                sock.close()
