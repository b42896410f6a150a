"""End to end: with `smtp_processes = 2` a TLS session ticket from one process resumes on the
other, also after a SIGHUP reload that renews the certificate (`net.tls_tickets`).

Which process takes a connection is the kernel's choice; to make every step cross processes,
the test freezes one of them with SIGSTOP (as tests/e2e/test_workers.py does), alternately,
so the connections go daemon, worker, daemon, ... and each offers the previous connection's
session. The log's `smtpd[PID]: connect from` lines show who served them. A burst with both
processes running shows the same without help. Clients: Python's `ssl` (a session per
connection object) and `openssl s_client` (a session file, `-sess_out`/`-sess_in`).
"""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trustme
from tests.e2e.conftest import ServerFactory
from tests.e2e.test_workers import frozen, worker_pid
from tests.support.server import MailServer

pytestmark = pytest.mark.e2e

#: connections per check: enough to cross between the processes many times, bounded
ALTERNATIONS = 16
BURST = 20
APPLIED = r"reload: configuration .* applied"


def certificate(directory: Path, name: str) -> dict[str, str]:
    """`[tls]` settings for a fresh certificate for 127.0.0.1 named `name`."""
    directory.mkdir(parents=True, exist_ok=True)
    cert = trustme.CA().issue_cert("mx.test", "127.0.0.1", common_name=name)
    cert.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    cert.private_key_pem.write_to_path(str(directory / "key.pem"))
    return {"cert": str(directory / "cert.pem"), "key": str(directory / "key.pem")}


def settings(tls: dict[str, str]) -> dict[str, Any]:
    return {"smtp_processes": 2, "local_domains": ["localhost"], "log_level": "info",
            "tls": tls}


def client_context() -> ssl.SSLContext:
    """One client context for all connections (a session belongs to the context it came from)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def reply(sock: socket.socket | ssl.SSLSocket) -> int:
    """Read one (multi-line) SMTP reply; its code. Bounded by the socket's timeout."""
    data = b""
    while not re.search(rb"(^|\r\n)\d{3} [^\r\n]*\r\n$", data):
        chunk = sock.recv(4096)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return int(data.rsplit(b"\r\n", 2)[-2][:3])


def starttls(server: MailServer, client: ssl.SSLContext,
             session: ssl.SSLSession | None) -> tuple[ssl.SSLSession, bool, str]:
    """EHLO, STARTTLS with `session` offered, EHLO, QUIT: (the session it leaves, whether it
    was resumed, the certificate's subject)."""
    raw = socket.create_connection((server.host, server.smtp_port), timeout=10)
    with raw:
        assert reply(raw) == 220
        raw.sendall(b"EHLO client.test\r\n")
        assert reply(raw) == 250
        raw.sendall(b"STARTTLS\r\n")
        assert reply(raw) == 220
        with client.wrap_socket(raw, server_hostname="mx.test", session=session) as tls:
            tls.sendall(b"EHLO client.test\r\n")
            assert reply(tls) == 250  # TLS 1.3's tickets come before it
            tls.sendall(b"QUIT\r\n")
            assert reply(tls) == 221
            der = tls.getpeercert(binary_form=True)
            assert tls.session is not None and der is not None
            name = ssl.DER_cert_to_PEM_cert(der)
            return tls.session, tls.session_reused, name


def served_by(server: MailServer) -> list[int]:
    """The PID of the process that logged each `connect from`, in order."""
    return [int(m) for m in re.findall(r"smtpd\[(\d+)\]: connect from", server.log())]


def alternate(server: MailServer, worker: int, client: ssl.SSLContext,
              session: ssl.SSLSession | None) -> tuple[ssl.SSLSession | None, list[bool], str]:
    """`ALTERNATIONS` connections, daemon and worker in turn (the other one frozen), each
    offering the session of the one before; (last session, resumed per connection, cert)."""
    resumed, cert = [], ""
    before = len(served_by(server))
    for i in range(ALTERNATIONS):
        with frozen(worker if i % 2 == 0 else server.pid):
            session, reused, cert = starttls(server, client, session)
        resumed.append(reused)
    server.wait_for_log(r"smtpd\[\d+\]: connect from", count=before + ALTERNATIONS, timeout=10)
    assert served_by(server)[before:] == [server.pid, worker] * (ALTERNATIONS // 2)
    return session, resumed, cert


def test_a_ticket_from_one_process_resumes_on_the_other(
    mail_server: ServerFactory, tmp_path: Path
) -> None:
    server = mail_server(settings=settings(certificate(tmp_path / "v1", "first.test")))
    worker = worker_pid(server)
    client = client_context()
    session, resumed, _ = alternate(server, worker, client, None)
    assert resumed == [False] + [True] * (ALTERNATIONS - 1), resumed
    # both running: whoever the kernel picks, every connection resumes
    before = len(served_by(server))
    burst = []
    for _ in range(BURST):
        session, reused, _ = starttls(server, client, session)
        burst.append(reused)
    assert all(burst), burst
    server.wait_for_log(r"smtpd\[\d+\]: connect from", count=before + BURST, timeout=10)
    assert "no TLS ticket key from the daemon" not in server.log()
    assert "cannot share ticket keys" not in server.log()


def test_tickets_survive_a_reload_that_renews_the_certificate(
    mail_server: ServerFactory, tmp_path: Path
) -> None:
    server = mail_server(settings=settings(certificate(tmp_path / "v1", "first.test")))
    worker = worker_pid(server)
    client = client_context()
    session, resumed, first = alternate(server, worker, client, None)
    assert all(resumed[1:])
    applied = len(re.findall(APPLIED, server.log()))
    server.update_config({"tls": certificate(tmp_path / "v2", "second.test")})
    server.reload()  # the daemon passes the SIGHUP on to its worker: both log it
    server.wait_for_log(APPLIED, count=applied + 2, timeout=20)
    # a resumed session keeps the certificate it was made with; a new one shows the renewal
    session, resumed, cert = alternate(server, worker, client, session)
    assert all(resumed), resumed
    assert cert == first
    _, reused, renewed = starttls(server, client_context(), None)
    assert not reused and renewed != first


def s_client_resumes(server: MailServer, session_file: Path) -> bool:
    """One `openssl s_client -starttls smtp` that offers and then saves `session_file`."""
    argv = ["openssl", "s_client", "-starttls", "smtp", "-noservername", "-ign_eof",
            "-connect", f"{server.host}:{server.smtp_port}", "-sess_out", str(session_file)]
    if session_file.exists():
        argv += ["-sess_in", str(session_file)]
    out = subprocess.run(argv, input=b"EHLO client.test\r\nQUIT\r\n", capture_output=True,
                         timeout=15, check=False).stdout.decode(errors="replace")
    [handshake] = re.findall(r"^(New|Reused), TLSv1\.3", out, re.M)
    return handshake == "Reused"


def test_openssl_s_client_resumes_on_either_process(
    mail_server: ServerFactory, tmp_path: Path
) -> None:
    server = mail_server(settings=settings(certificate(tmp_path / "v1", "first.test")))
    worker = worker_pid(server)
    session_file = tmp_path / "session.pem"
    resumed = []
    for i in range(6):
        with frozen(worker if i % 2 == 0 else server.pid):
            resumed.append(s_client_resumes(server, session_file))
    assert resumed == [False] + [True] * 5, resumed
    assert set(served_by(server)) == {server.pid, worker}
