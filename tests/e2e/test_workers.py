"""End to end: `smtp_processes = 2`, a worker process beside the daemon, each with its own shard.

To prove that the *worker* received and delivered a message (the kernel may hand any connection
to either process), the daemon is frozen with SIGSTOP: only the worker can then accept, answer,
commit and deliver. Freezing the worker instead puts a message in the daemon's shard, so a test
can hold one message in each shard and show that ETRN, `mailhaven queue` and the listing reach
both. The lifeline is shown by SIGKILLing the daemon: the worker stops by itself. Lowering
`smtp_processes` to 1 makes the daemon adopt the worker's shard: nothing is stranded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from tests.e2e.conftest import ServerFactory
from tests.support.server import MailServer, free_port

pytestmark = pytest.mark.e2e

SETTINGS: dict[str, Any] = {
    "smtp_processes": 2,
    "local_domains": ["localhost"],
    "local_users": ["alice"],
    "log_level": "info",
}
#: parttime.test is held; once released it goes to a loopback port where nothing listens, so
#: each attempt defers at once (no DNS wait)
HELD = dict(
    SETTINGS,
    etrn={"held_domains": ["parttime.test"]},
    relay={"transport": {"parttime.test": f"[127.0.0.1]:{free_port()}"}},
)


def message(mark: str) -> bytes:
    return f"From: <bob@remote.test>\r\nSubject: {mark}\r\n\r\nbody {mark}\r\n".encode()


def worker_pid(server: MailServer, count: int = 1) -> int:
    [*_, match] = server.wait_for_log(r"worker 1 started \(pid (\d+)\)", count=count, timeout=10)
    server.wait_for_log(r"worker 1 ready on 1 smtp socket", count=count, timeout=10)
    return int(match.group(1))


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


@contextmanager
def frozen(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def send(server: MailServer, rcpt: str, mark: str) -> str:
    """One message over SMTP; returns its queue id."""
    with smtplib.SMTP(server.host, server.smtp_port, timeout=20) as client:
        client.ehlo("client.test")
        client.mail("bob@remote.test")
        client.rcpt(rcpt)
        code, reply = client.data(message(mark))
    assert code == 250 and b"queued as" in reply, reply
    return reply.decode().rsplit(" ", 1)[-1]


def listed(server: MailServer) -> dict[str, list[str]]:
    """`mailhaven queue list --json`: queue id -> each recipient's hold reasons."""
    shown = server.queue_cli("list", "--json")
    assert shown.returncode == 0, shown.stderr
    out: dict[str, list[str]] = {}
    for line in shown.stdout.splitlines():
        msg = json.loads(line)
        out[msg["queue_id"]] = [",".join(r["hold"]) for r in msg["recipients"]]
    return out


def one_held_message_per_shard(server: MailServer, worker: int) -> tuple[str, str]:
    """(queue id in the daemon's shard, queue id in the worker's shard), both held."""
    with frozen(worker):
        in_daemon = send(server, "gw@parttime.test", "daemon's")
    with frozen(server.pid):
        in_worker = send(server, "gw@parttime.test", "worker's")
    server.wait_for_log(rf"smtpd\[{worker}\]: {in_worker}: client=", timeout=5)
    assert (server.state_dir / "spool-1" / "queue.db").exists()
    return in_daemon, in_worker


def test_the_worker_receives_and_delivers_while_the_daemon_is_frozen(
    mail_server: ServerFactory,
) -> None:
    server = mail_server(settings=SETTINGS)
    pid = worker_pid(server)
    try:
        with frozen(server.pid):
            qid = send(server, "alice@localhost", "frozen")
            # the worker's own scheduler delivers it: the daemon is still stopped
            [delivered] = server.wait_for_messages("alice", 1, timeout=10)
            assert b"body frozen" in delivered.read_bytes()
        server.wait_for_log(rf"smtpd\[{pid}\]: {qid}: client=", timeout=5)
        server.wait_for_log(rf"\[{pid}\]: {qid}: to=<alice@localhost>.* status=sent", timeout=5)
        # both processes serve the same port: a burst is received and delivered in full
        for i in range(20):
            with smtplib.SMTP(server.host, server.smtp_port, timeout=20) as client:
                client.sendmail("bob@remote.test", ["alice@localhost"], message(f"burst {i}"))
        assert len(server.wait_for_messages("alice", 21, timeout=20)) == 21
        assert listed(server) == {}, "finished mail leaves both shards"
    finally:
        server.stop()
    assert wait_gone(pid), "SIGTERM to the daemon stops its worker too"


def test_etrn_and_queue_commands_reach_every_shard(mail_server: ServerFactory) -> None:
    server = mail_server(settings=HELD)
    worker = worker_pid(server)
    in_daemon, in_worker = one_held_message_per_shard(server, worker)
    assert listed(server) == {in_daemon: ["route"], in_worker: ["route"]}
    # `queue hold` / `release` go through the daemon, which passes them on to the worker
    held = server.queue_cli("hold", in_daemon, in_worker)
    assert held.returncode == 0 and "hold: 2 message(s)" in held.stdout, held
    assert listed(server) == {in_daemon: ["route,admin"], in_worker: ["route,admin"]}
    released = server.queue_cli("release", in_daemon, in_worker)
    assert released.returncode == 0 and "release: 2 message(s)" in released.stdout, released
    # ETRN on the worker: the daemon releases the domain in both shards and counts both
    with frozen(server.pid):  # only the worker can take this connection
        client = smtplib.SMTP(server.host, server.smtp_port, timeout=20)
        client.ehlo("gw.parttime.test")
    try:
        code, text = client.docmd("ETRN", "parttime.test")
        assert code == 253 and b"2 pending messages" in text, text
        assert client.docmd("ETRN", "other.test")[0] == 459
    finally:
        client.quit()
    # released: each shard tries its own message (nobody listens there: deferred)
    for qid in (in_daemon, in_worker):
        server.wait_for_log(rf"{qid}: to=<gw@parttime\.test>.* status=deferred", timeout=20)
    assert listed(server) == {in_daemon: [""], in_worker: [""]}
    deleted = server.queue_cli("delete", in_daemon, in_worker)
    assert deleted.returncode == 0 and "delete: 2 message(s)" in deleted.stdout, deleted
    assert listed(server) == {}


def test_lowering_smtp_processes_adopts_the_workers_shard(mail_server: ServerFactory) -> None:
    server = mail_server(settings=HELD)
    worker = worker_pid(server)
    in_daemon, in_worker = one_held_message_per_shard(server, worker)
    assert server.stop() == 0
    # offline, the command line still sees both shards
    assert set(listed(server)) == {in_daemon, in_worker}
    server.update_config({"smtp_processes": 1})
    server.start()
    server.wait_for_log(r"adopted 1 message\(s\) from .*spool-1", timeout=10)
    assert not (server.state_dir / "spool-1").exists()
    assert listed(server) == {in_daemon: ["route"], in_worker: ["route"]}
    with smtplib.SMTP(server.host, server.smtp_port, timeout=20) as client:
        client.ehlo("gw.parttime.test")
        code, text = client.docmd("ETRN", "parttime.test")
    assert code == 253 and b"2 pending messages" in text, text


def test_the_worker_stops_when_the_daemon_is_killed(mail_server: ServerFactory) -> None:
    server = mail_server(settings=SETTINGS)
    pid = worker_pid(server)
    try:
        server.kill()  # SIGKILL: no shutdown code runs in the daemon
        assert wait_gone(pid), "the lifeline pipe's end of file stops the worker"
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_worker_that_dies_is_restarted_and_recovers_its_shard(
    mail_server: ServerFactory,
) -> None:
    server = mail_server(settings=HELD)
    worker = worker_pid(server)
    in_daemon, in_worker = one_held_message_per_shard(server, worker)
    os.kill(worker, signal.SIGKILL)
    assert wait_gone(worker)
    again = worker_pid(server, count=2)
    assert again != worker
    assert re.search(r"worker 1 \(pid \d+\) exited", server.log())
    assert listed(server) == {in_daemon: ["route"], in_worker: ["route"]}


def test_sighup_reaches_the_worker(mail_server: ServerFactory) -> None:
    """The daemon forwards SIGHUP; the worker re-reads the file (a new mailbox here)."""
    server = mail_server(settings=SETTINGS)
    worker = worker_pid(server)
    server.update_config({"local_users": ["alice", "carol"]})
    server.reload()
    server.wait_for_log(rf"\[{worker}\]: .*reload: configuration .* applied", timeout=10)
    with frozen(server.pid):  # only the worker can take it
        send(server, "carol@localhost", "after reload")
        [delivered] = server.wait_for_messages("carol", 1, timeout=10)
    assert b"body after reload" in delivered.read_bytes()
    assert "Traceback" not in server.log()
