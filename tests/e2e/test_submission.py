"""End to end: authenticated submission over TLS with real clients nobody here wrote.

A real `mailhaven serve` process (one per module, plus own servers for tests that need another
configuration) listens on loopback with an MX listener, a submission listener (STARTTLS, AUTH
required) and a submissions listener (implicit TLS, RFC 8314). Its certificate comes from a
`trustme` CA and every client verifies it against that CA: swaks (`--tls-verify
--tls-ca-path`), msmtp (`tls_trust_file`), Python's `smtplib.SMTP_SSL` with a verifying context.
Users live in a Dovecot-style passwd-file (argon2id, cheap parameters). `trusted_networks` is
empty, so only authentication lets a client relay. Remote mail goes, through a loopback DNS
server (`tests.support.dns_server`), to a recording aiosmtpd sink on 127.0.0.2.

Shown here: STARTTLS + AUTH PLAIN / LOGIN, implicit TLS, a wrong password answered `535 5.7.8`,
delivery to a local Maildir and relay to the sink; msmtp as a desktop client; smtplib over
SMTP_SSL; over real sockets, AUTH and MAIL refused before TLS/AUTH, pipelined plaintext after
STARTTLS never answered inside TLS, relay refused for address disguises, the sender-login
check, the brute-force brake (while another client is served normally) and the limits not
already shown by `test_receive.py` (total connections, connection and message rates, commands
per session, pipelining past a group-ending command); SIGHUP reloading the certificate and the
users file. A regression test sends EHLO in the same segment as the client's TLS Finished (what
msmtp/GnuTLS does), which the server used to drop as pre-TLS plaintext.

swaks needs Net::SSLeay for TLS (Debian: libnet-ssleay-perl); without it those tests skip.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import os
import poplib
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trustme
from argon2 import PasswordHasher
from tests.e2e.conftest import ServerFactory
from tests.e2e.send_support import Sink, free_port_on, relay_settings
from tests.support.dns_server import DNSServer
from tests.support.server import MailServer, RawClient, merge

from mailhaven.checks.auth_failures import FAILURE_DELAY, MAX_FAILURES
from mailhaven.mailbox.users import UserDB

pytestmark = pytest.mark.e2e

#: Cheap argon2id parameters: the tests check behaviour, not hash strength.
FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
PASSWORDS = {"alice": "secret", "bob": "hunter2", "carol": "c0rrect horse"}
SINK_IP = "127.0.0.2"
RECORDS = {
    "remote.test": {"MX": [(10, "mx.remote.test")]},
    "mx.remote.test": {"A": [SINK_IP]},
}
QUEUED = re.compile(r"queued as ([A-Za-z0-9]+)")


@dataclass
class Certs:
    """A trustme CA and a server certificate for mx.test, localhost and 127.0.0.1."""

    ca_file: Path
    chain_file: Path
    other_ca_file: Path  # a CA that did not sign the server certificate

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    directory = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    cert = ca.issue_cert("mx.test", "localhost", "127.0.0.1", common_name="mx.test")
    out = Certs(directory / "ca.pem", directory / "server.pem", directory / "other-ca.pem")
    ca.cert_pem.write_to_path(str(out.ca_file))
    cert.private_key_and_cert_chain_pem.write_to_path(str(out.chain_file))
    trustme.CA().cert_pem.write_to_path(str(out.other_ca_file))
    return out


def write_users(path: Path) -> Path:
    db = UserDB(path, hasher=FAST_HASHER)
    for name, password in PASSWORDS.items():
        db.add(name, password)
    return path


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_users(tmp_path_factory.mktemp("users") / "users.passwd")


@pytest.fixture(scope="module")
def sink() -> Iterator[Sink]:
    with Sink(SINK_IP, free_port_on([SINK_IP])) as running:
        yield running


def submission_settings(
    certs: Certs, users_file: Path, dns: DNSServer, sink: Sink, **top: Any
) -> dict[str, Any]:
    settings = relay_settings(
        dns=dns.address,
        port=sink.port,
        local_users=["postmaster"],
        users_file=str(users_file),
        tls={"cert": str(certs.chain_file), "key": str(certs.chain_file)},
        trusted_networks=[],  # relaying needs AUTH, even from loopback
        aliases={"info": ["alice"]},
        # the disguise test errs a dozen times in one session: keep the tarpit short
        limits={"error_sleep": 0.05},
    )
    return merge(settings, top)


SERVICES = ("smtp", "submission", "submissions")


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def server(
    request: pytest.FixtureRequest,
    module_mail_server: ServerFactory,
    certs: Certs,
    users_file: Path,
    dns: DNSServer,
    sink: Sink,
) -> MailServer:
    """One server per event loop (`event_loop`): every test on this fixture, the STARTTLS
    injection test among them, runs on the standard library's loop and on uvloop."""
    settings = submission_settings(certs, users_file, dns, sink, event_loop=request.param)
    server = module_mail_server(settings=settings, services=SERVICES)
    server.wait_for_log(rf"starting mailhaven: .* event_loop={request.param}$")
    return server


@pytest.fixture(scope="session")
def swaks_tls(swaks: str) -> str:
    """swaks with TLS support (it needs Net::SSLeay: Debian's libnet-ssleay-perl)."""
    support = subprocess.run(
        [swaks, "--support"], capture_output=True, text=True, timeout=30, check=False
    )
    if "TLS supported" not in support.stdout + support.stderr:
        pytest.skip("swaks lacks TLS support: install libnet-ssleay-perl")
    return swaks


@pytest.fixture(scope="session")
def msmtp() -> str:
    path = shutil.which("msmtp")
    if path is None:
        pytest.skip("msmtp is not installed (scripts/install-test-deps)")
    return path


# ---------------------------------------------------------------------- helpers


def marker() -> str:
    return uuid.uuid4().hex


def message(mark: str, *, sender: str = "alice@localhost", to: str = "bob@localhost") -> bytes:
    return (
        f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: submission {mark}\r\n\r\nbody {mark}\r\n"
    ).encode()



def wait_sink(sink: Sink, mark: str, *, timeout: float = 10.0) -> Any:
    """The sink's transaction that carries `mark`."""
    deadline = time.monotonic() + timeout
    while True:
        for item in list(sink.received):
            if mark.encode() in item.content:
                return item
        if time.monotonic() > deadline:
            raise AssertionError(f"sink did not get {mark}; RCPTs seen: {sink.rcpt_log}")
        time.sleep(0.02)


def swaks_run(swaks: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [swaks, "--helo", "client.test", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def swaks_tls_args(server: MailServer, certs: Certs, *, implicit: bool) -> list[str]:
    service = "submissions" if implicit else "submission"
    return [
        "--server", f"{server.host}:{server.port(service)}",
        "--tls-on-connect" if implicit else "--tls",
        "--tls-verify", "--tls-ca-path", str(certs.ca_file),
    ]  # fmt: skip


def check_submitted(data: bytes, *, user: str, tls: bool = True) -> None:
    """Our Received: field records TLS, the login and the RFC 3848 `with ESMTPSA`."""
    head = data.split(b"\n\n", 1)[0].decode()
    full = user if "@" in user else f"{user}@localhost"  # the login, as its full address
    assert "(Authenticated sender: " + full + ")" in head, head
    assert re.search(r"with ESMTPSA id [A-Za-z0-9]+", head), head
    if tls:
        assert re.search(r"\(using TLSv1\.[23] with cipher \S+", head), head


def auth_plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def submission_client(
    server: MailServer, certs: Certs, *, source: str = "127.0.0.1"
) -> smtplib.SMTP:
    """smtplib on the submission port from `source`, after a verified STARTTLS."""
    smtp = smtplib.SMTP(
        server.host,
        server.port("submission"),
        local_hostname="client.test",
        timeout=20,
        source_address=(source, 0),
    )
    smtp.ehlo()
    smtp.starttls(context=certs.client_context())  # checks the name 127.0.0.1 too
    smtp.ehlo()
    return smtp


class SourceClient(RawClient):
    """`RawClient` from a chosen loopback source address (per-IP limits are per source)."""

    def __init__(self, host: str, port: int, source: str, *, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0)
        )
        self.buffer = bytearray()


# ---------------------------------------------------------------------- 1. swaks


def test_swaks_starttls_auth_plain_delivers_to_maildir(
    server: MailServer, certs: Certs, swaks_tls: str
) -> None:
    mark = marker()
    result = swaks_run(
        swaks_tls, *swaks_tls_args(server, certs, implicit=False),
        "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", PASSWORDS["alice"],
        "--from", "alice@localhost", "--to", "bob@localhost",
        "--header", f"Subject: plain {mark}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "=== TLS started with cipher TLSv1." in result.stdout
    # AUTH is offered only inside TLS (RFC 4954 §4 / RFC 3207 §4.2: the EHLO after STARTTLS)
    before, after = result.stdout.split(" -> STARTTLS", 1)
    assert "AUTH" not in before and "<~  250-AUTH PLAIN LOGIN" in after, result.stdout
    assert "<~  235 2.7.0 " in result.stdout
    data = server.wait_for_mark("bob", mark)
    check_submitted(data, user="alice")
    # submission fix-ups: swaks sends Date and Message-Id itself, nothing is added twice
    assert data.count(b"\nDate: ") == 1 and data.lower().count(b"\nmessage-id: ") == 1
    server.wait_for_log(r"sasl_method=PLAIN, sasl_username=alice")


def test_swaks_starttls_auth_login_relays_to_a_remote_domain(
    server: MailServer, certs: Certs, swaks_tls: str, sink: Sink
) -> None:
    """Authenticated relay: mail for remote.test goes to its MX (the sink on 127.0.0.2)."""
    mark = marker()
    result = swaks_run(
        swaks_tls, *swaks_tls_args(server, certs, implicit=False),
        "--auth", "LOGIN", "--auth-user", "alice", "--auth-password", PASSWORDS["alice"],
        "--from", "alice@localhost", "--to", "friend@remote.test",
        "--header", f"Subject: login {mark}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "~> AUTH LOGIN" in result.stdout and "<~  235 2.7.0 " in result.stdout
    got = wait_sink(sink, mark)
    assert got.rcpt_tos == ["friend@remote.test"]
    assert got.mail_from == "alice@localhost"
    check_submitted(got.content.replace(b"\r\n", b"\n"), user="alice")
    qid = QUEUED.search(result.stdout)
    assert qid, result.stdout
    server.wait_for_log(rf"{qid.group(1)}: to=<friend@remote\.test>, relay=mx\.remote\.test\[")


def test_swaks_implicit_tls_on_the_submissions_listener(
    server: MailServer, certs: Certs, swaks_tls: str
) -> None:
    mark = marker()
    result = swaks_run(
        swaks_tls, *swaks_tls_args(server, certs, implicit=True),
        "--auth", "PLAIN", "--auth-user", "bob", "--auth-password", PASSWORDS["bob"],
        "--from", "bob@localhost", "--to", "alice@localhost",
        "--header", f"Subject: implicit {mark}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    # TLS first, then the greeting, inside TLS (RFC 8314 §3.3); no STARTTLS is offered there
    assert result.stdout.index("=== TLS started") < result.stdout.index("<~  220 ")
    assert "STARTTLS" not in result.stdout
    check_submitted(server.wait_for_mark("alice", mark), user="bob")


def test_swaks_wrong_password_gets_535_and_nothing_is_sent(
    server: MailServer, certs: Certs, swaks_tls: str
) -> None:
    mark = marker()
    started = time.monotonic()
    result = swaks_run(
        swaks_tls, *swaks_tls_args(server, certs, implicit=False),
        "--auth", "PLAIN", "--auth-user", "carol", "--auth-password", "wrong",
        "--from", "carol@localhost", "--to", "bob@localhost",
        "--header", f"Subject: wrong {mark}",
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert re.search(r"<~\* +535 5\.7\.8 ", result.stdout), result.stdout
    assert "MAIL FROM" not in result.stdout  # swaks gives up: it was not let in
    assert elapsed >= FAILURE_DELAY * 0.9, elapsed  # the failure is answered late
    server.wait_for_log(r"SASL PLAIN authentication failed: user=carol")
    assert all(mark.encode() not in p.read_bytes() for p in server.messages("bob"))


def test_swaks_refuses_a_certificate_from_another_ca(
    server: MailServer, certs: Certs, swaks_tls: str
) -> None:
    """The clients really verify: with a CA that did not sign the certificate, swaks stops."""
    result = swaks_run(
        swaks_tls, "--server", f"{server.host}:{server.port('submission')}", "--tls",
        "--tls-verify", "--tls-ca-path", str(certs.other_ca_file), "--quit-after", "TLS",
    )  # fmt: skip
    assert result.returncode != 0, result.stdout
    assert "TLS started" not in result.stdout


# ---------------------------------------------------------------------- 2. msmtp and smtplib


def test_msmtp_desktop_client_submits_with_starttls_and_auth(
    server: MailServer, certs: Certs, msmtp: str, tmp_path: Path
) -> None:
    mark = marker()
    rc = tmp_path / "msmtprc"
    rc.write_text(
        "defaults\n"
        "account submission\n"
        f"host {server.host}\n"
        f"port {server.port('submission')}\n"
        "domain client.test\n"
        "tls on\n"
        "tls_starttls on\n"
        "tls_certcheck on\n"
        f"tls_trust_file {certs.ca_file}\n"
        "auth on\n"
        "user alice\n"
        f"password {PASSWORDS['alice']}\n"
        "from alice@localhost\n"
        "account default : submission\n"
    )
    rc.chmod(0o600)  # msmtp refuses a password in a file others may read
    content = (
        f"From: Alice <alice@localhost>\nTo: Bob <bob@localhost>\nSubject: msmtp {mark}\n\n"
        f"Sent by msmtp, {mark}.\n"
    )
    result = subprocess.run(
        [msmtp, "-C", str(rc), "-t"],
        input=content,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    data = server.wait_for_mark("bob", mark)
    check_submitted(data, user="alice")
    # msmtp sends no Date: or Message-ID:; the submission fix-ups add them (RFC 6409 §8)
    assert re.search(rb"\nDate: ", data), data
    assert re.search(rb"\nMessage-ID: <[^>]+@[^>]+>", data, re.I), data
    assert f"Sent by msmtp, {mark}.".encode() in data


def test_msmtp_with_the_wrong_ca_does_not_send(
    server: MailServer, certs: Certs, msmtp: str, tmp_path: Path
) -> None:
    rc = tmp_path / "msmtprc"
    rc.write_text(
        f"account default\nhost {server.host}\nport {server.port('submission')}\n"
        f"tls on\ntls_starttls on\ntls_trust_file {certs.other_ca_file}\n"
        "auth on\nuser alice\npassword secret\nfrom alice@localhost\n"
    )
    rc.chmod(0o600)
    result = subprocess.run(
        [msmtp, "-C", str(rc), "bob@localhost"],
        input="Subject: never\n\nnever\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert result.returncode != 0
    assert "certificate" in (result.stdout + result.stderr).lower()


def test_smtplib_smtp_ssl_on_the_submissions_listener(server: MailServer, certs: Certs) -> None:
    mark = marker()
    context = certs.client_context()  # verifies the chain and the name (127.0.0.1 is in it)
    with smtplib.SMTP_SSL(
        server.host, server.port("submissions"), context=context, timeout=20,
        local_hostname="client.test",
    ) as smtp:  # fmt: skip
        assert isinstance(smtp.sock, ssl.SSLSocket)
        assert smtp.sock.version() in ("TLSv1.2", "TLSv1.3")
        smtp.ehlo()
        assert set(smtp.esmtp_features["auth"].upper().split()) >= {"PLAIN", "LOGIN"}
        smtp.login("bob", PASSWORDS["bob"])
        refused = smtp.sendmail("bob@localhost", ["alice@localhost"], message(mark, to="alice"))
        assert refused == {}
    check_submitted(server.wait_for_mark("alice", mark), user="bob")


# ---------------------------------------------------------------------- 3. security


def test_auth_and_mail_are_refused_before_tls_and_auth(server: MailServer, certs: Certs) -> None:
    with RawClient(server.host, server.port("submission")) as client:
        assert client.reply()[0] == 220
        code, lines = client.command("EHLO client.test")
        assert code == 250 and "STARTTLS" in lines
        assert not any(line.startswith("AUTH") for line in lines), lines
        code, text = client.command("AUTH PLAIN " + auth_plain("alice", PASSWORDS["alice"]))
        assert code == 538 and text[0].startswith("5.7.11"), (code, text)
        code, text = client.command("AUTH LOGIN")
        assert code == 538 and text[0].startswith("5.7.11"), (code, text)
        code, text = client.command("MAIL FROM:<alice@localhost>")
        assert code == 530 and text[0].startswith("5.7.0"), (code, text)
        assert client.command("QUIT")[0] == 221
    # inside TLS but not authenticated: MAIL is still refused (RFC 6409 §4.1)
    with submission_client(server, certs) as smtp:
        code, text = smtp.mail("alice@localhost")
        assert code == 530 and text.startswith(b"5.7.0"), (code, text)
        assert smtp.rcpt("bob@localhost")[0] == 503
    # no credentials are accepted in the clear on the MX port either: AUTH is not offered
    with RawClient(server.host, server.smtp_port) as client:
        assert client.reply()[0] == 220
        code, lines = client.command("EHLO client.test")
        assert not any(line.startswith("AUTH") for line in lines), lines


def test_pipelined_plaintext_after_starttls_is_not_answered_inside_tls(
    server: MailServer, certs: Certs
) -> None:
    """CVE-2011-0411: `STARTTLS\\r\\nNOOP\\r\\n` in one packet; the NOOP must be dropped."""
    with RawClient(server.host, server.port("submission")) as client:
        assert client.reply()[0] == 220
        assert client.command("EHLO client.test")[0] == 250
        client.send(b"STARTTLS\r\nNOOP\r\nMAIL FROM:<alice@localhost>\r\n")
        code, _ = client.reply()
        assert code == 220
        assert not client.buffer, bytes(client.buffer)  # nothing more came in plaintext
        tls = certs.client_context().wrap_socket(client.sock, server_hostname="mx.test")
        tls.settimeout(10)
        client.sock = tls
        # the first reply inside TLS answers our EHLO: not the injected NOOP or MAIL
        code, lines = client.command("EHLO client.test")
        assert code == 250 and lines[0] == "mx.test", lines
        assert "AUTH PLAIN LOGIN" in lines and "STARTTLS" not in lines, lines
        code, text = client.command("NOOP")
        assert (code, text) == (250, ["2.0.0 Ok"])
        code, text = client.command("STARTTLS")  # a second STARTTLS is refused
        assert code == 554 and text[0].startswith("5.5.1"), (code, text)


def tls_then_at_once(sock: socket.socket, context: ssl.SSLContext, first: bytes) -> bytes:
    """Finish a client TLS handshake over `sock` and send `first` in the same TCP segment as
    the client's Finished (what GnuTLS clients such as msmtp do); return the first reply."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    for _ in range(20):
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            data = sock.recv(65536)
            assert data, "server closed during the handshake"
            incoming.write(data)
    else:
        raise AssertionError("TLS handshake did not finish")
    tls.write(first)
    sock.sendall(outgoing.read())  # Finished + the command, one write
    reply = b""
    for _ in range(50):  # bounded; each recv has the socket's timeout
        if re.search(rb"(^|\n)\d{3} [^\n]*\n", reply):
            return reply
        data = sock.recv(65536)
        assert data, f"server closed; got {reply!r}"
        incoming.write(data)
        with contextlib.suppress(ssl.SSLWantReadError):
            reply += tls.read(65536)
    raise AssertionError(f"no complete reply: {reply!r}")


def test_a_command_in_the_clients_finished_flight_is_answered(
    server: MailServer, certs: Certs
) -> None:
    """Regression: the EHLO that arrives with the handshake's last flight is TLS input (it was
    dropped as pre-TLS plaintext, and msmtp waited forever)."""
    with RawClient(server.host, server.port("submission")) as client:
        assert client.reply()[0] == 220
        assert client.command("EHLO client.test")[0] == 250
        assert client.command("STARTTLS")[0] == 220
        reply = tls_then_at_once(client.sock, certs.client_context(), b"EHLO client.test\r\n")
    assert reply.startswith(b"250-mx.test\r\n") and b"250-AUTH PLAIN LOGIN\r\n" in reply, reply


DISGUISES = [
    # (not in test_receive.py's list, which covers %, !, quoted and two-hop source routes)
    "user%remote.test@localhost",
    "user%remote.test@LOCALHOST",
    '"user%remote.test"@localhost',
    "user%remote.test%localhost@localhost",
    "@localhost:user@remote.test",
    "@a.example:user@remote.test",
    "user@remote.test@localhost",
    "user@localhost@remote.test",
    "USER@REMOTE.TEST",
    "user@remote.test.",
    f"user@[{SINK_IP}]",
    "user@[IPv6:::2]",
]


def test_no_relay_for_unauthenticated_clients_in_any_disguise(
    server: MailServer, sink: Sink
) -> None:
    """Port 25, no trusted networks, no AUTH: no disguise gets a remote address accepted."""
    before = len(sink.received)
    with RawClient(server.host, server.smtp_port) as client:
        assert client.reply()[0] == 220
        assert client.command("EHLO client.test")[0] == 250
        for rcpt in DISGUISES:
            assert client.command("RSET")[0] == 250
            assert client.command("MAIL FROM:<x@example.org>")[0] == 250
            code, text = client.command(f"RCPT TO:<{rcpt}>")
            assert code >= 500, (rcpt, code, text)
            assert text[0].startswith(("5.7.1", "5.1.1", "5.1.3", "5.5.4", "5.1.2")), (rcpt, text)
        code, _ = client.command("DATA")
        assert code in (503, 554)
        assert client.command("QUIT")[0] == 221
    # the refusals are logged, the sink saw nothing, and local mail is still welcome
    server.wait_for_log(r"NOQUEUE: reject: RCPT from .*: 554 5\.7\.1 ")
    assert len(sink.received) == before
    with smtplib.SMTP(server.host, server.smtp_port, timeout=20) as smtp:
        mark = marker()
        assert smtp.sendmail("x@example.org", ["bob@localhost"], message(mark)) == {}
    server.wait_for_mark("bob", mark)


def test_authenticated_disguised_local_addresses_are_not_relayed(
    server: MailServer, certs: Certs, sink: Sink
) -> None:
    """Even a logged-in user cannot make a local address relay (no percent hack): the routed
    forms are unknown local users, and the plain remote address is relayed as itself."""
    before = len(sink.received)
    with submission_client(server, certs) as smtp:
        smtp.login("alice", PASSWORDS["alice"])
        assert smtp.mail("alice@localhost")[0] == 250
        for rcpt in ("user%remote.test@localhost", "remote.test!user@localhost"):
            code, text = smtp.rcpt(rcpt)
            assert code == 550 and text.startswith(b"5.1.1"), (rcpt, code, text)
        # (smtplib's rcpt() would mangle a source route: send the command as it is)
        code, text = smtp.docmd("RCPT TO:<@a.example:source-routed@remote.test>")
        assert code == 250, (code, text)
        mark = marker()
        code, text = smtp.data(message(mark, to="source-routed@remote.test"))
        assert code == 250, text
    got = wait_sink(sink, mark)
    assert got.rcpt_tos == ["source-routed@remote.test"]  # the source route was dropped
    assert len(sink.received) == before + 1


def test_sender_login_check_on_submission(server: MailServer, certs: Certs) -> None:
    with submission_client(server, certs) as smtp:
        smtp.login("alice", PASSWORDS["alice"])
        for other in ("bob@localhost", "alice@remote.test", "postmaster@localhost"):
            code, text = smtp.mail(other)
            assert code == 553 and text.startswith(b"5.7.1"), (other, code, text)
            assert b"not owned by user alice" in text
        # her own address, in any case, and an alias that delivers to her are hers
        mark = marker()
        assert smtp.mail("info@localhost")[0] == 250
        assert smtp.rcpt("bob@localhost")[0] == 250
        assert smtp.data(message(mark, sender="info@localhost"))[0] == 250
        assert smtp.mail("Alice@LOCALHOST")[0] == 250
        assert smtp.rset()[0] == 250
    server.wait_for_mark("bob", mark)
    server.wait_for_log(r"NOQUEUE: reject: MAIL from .*: 553 5\.7\.1 <bob@localhost>")


def test_brute_force_auth_is_slowed_while_others_are_served(
    mail_server: ServerFactory,
    certs: Certs,
    dns: DNSServer,
    sink: Sink,
    tmp_path: Path,
) -> None:
    """An attacker on 127.0.0.1 guesses alice's password on ten connections at once: each
    guess is answered `535 5.7.8` only after the failure delay, and then alice and everyone
    else still log in from elsewhere (the brake falls on the guessing address, as Dovecot's
    auth penalty does). Meanwhile a client on 127.0.0.3 logs in as bob and submits without
    waiting for the attacker. The blocks themselves, and the address's back-off, are shown with
    short delays by test_failed_logins_block_the_pair_and_back_off_the_address."""
    own = mail_server(
        settings=submission_settings(certs, write_users(tmp_path / "users"), dns, sink),
        services=("submission",),
    )
    # every guess is sent at once, past its TLS handshake: a guess sent after a failure would
    # first wait out the address's back-off
    ready = threading.Barrier(MAX_FAILURES)

    def guess(number: int) -> tuple[int, bytes, float]:
        with submission_client(own, certs) as smtp:
            ready.wait(timeout=30)
            started = time.monotonic()
            code, text = smtp.docmd("AUTH", "PLAIN " + auth_plain("alice", f"guess{number}"))
            return code, text, time.monotonic() - started

    attack = concurrent.futures.ThreadPoolExecutor(MAX_FAILURES)
    try:
        guesses = [attack.submit(guess, n) for n in range(MAX_FAILURES)]
        own.wait_for_log(
            r"SASL PLAIN authentication failed: user=alice", count=MAX_FAILURES, timeout=30
        )
        # the attack is in its delay now; a legitimate client elsewhere is served at once
        mark = marker()
        started = time.monotonic()
        with submission_client(own, certs, source="127.0.0.3") as smtp:
            smtp.login("bob", PASSWORDS["bob"])
            assert smtp.sendmail("bob@localhost", ["carol@localhost"], message(mark)) == {}
        served_in = time.monotonic() - started
        results = [g.result(timeout=60) for g in guesses]
    finally:
        attack.shutdown(wait=True)
    assert served_in < FAILURE_DELAY, served_in
    for code, text, took in results:
        assert code == 535 and text.startswith(b"5.7.8"), (code, text)
        assert took >= FAILURE_DELAY * 0.9, took
    own.wait_for_mark("carol", mark)

    def attempt(source: str, user: str, password: str | None = None) -> tuple[int, bytes]:
        with submission_client(own, certs, source=source) as smtp:
            secret = PASSWORDS[user.strip().lower()] if password is None else password
            return smtp.docmd("AUTH", "PLAIN " + auth_plain(user, secret))

    # The attack cannot lock alice out of her own logins from elsewhere, nor anyone else.
    assert attempt("127.0.0.4", "alice")[0] == 235
    assert attempt("127.0.0.4", "carol")[0] == 235
    # A name with a line break is logged escaped: it cannot forge a log line of its own.
    forged = "eve\r\nDec  4 12:00:00 mx mailhaven/smtpd[1]: forged"
    assert attempt("127.0.0.5", forged, "x")[0] == 535
    own.wait_for_log(r"authentication failed: user=eve\\x0d\\x0aDec  4 12:00:00 mx .*forged$")
    assert not any(line.startswith("Dec  4 12:00:00 mx") for line in own.log_lines())


class SourcePOP3(poplib.POP3):
    """poplib from a chosen loopback source address (the limiter counts per address)."""

    def __init__(self, host: str, port: int, source: str) -> None:
        self.source = source
        super().__init__(host, port, timeout=20)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self.source, 0)
        )


@dataclass(frozen=True)
class Login:
    """One login's outcome: the reply (SMTP code or POP3 PASS line) and how long it took."""

    reply: int | bytes
    took: float


def smtp_login(
    server: MailServer,
    certs: Certs,
    source: str,
    user: str,
    password: str,
    ready: threading.Barrier | None = None,
) -> Login:
    """One AUTH PLAIN over STARTTLS from `source`, sent once `ready` lets it."""
    with submission_client(server, certs, source=source) as smtp:
        if ready is not None:
            ready.wait(timeout=30)
        started = time.monotonic()
        code = smtp.docmd("AUTH", "PLAIN " + auth_plain(user, password))[0]
        return Login(code, time.monotonic() - started)


def pop3_login(
    server: MailServer,
    source: str,
    user: str,
    password: str,
    ready: threading.Barrier | None = None,
) -> Login:
    """USER/PASS from `source` (plaintext is allowed on loopback), PASS sent once `ready`
    lets it."""
    client = SourcePOP3(server.host, server.port("pop3"), source)
    try:
        client.user(user)
        if ready is not None:
            ready.wait(timeout=30)
        started = time.monotonic()
        try:
            reply = client.pass_(password)
        except poplib.error_proto as err:
            return Login(bytes(err.args[0]), time.monotonic() - started)
        took = time.monotonic() - started
        client.quit()
        return Login(reply, took)
    finally:
        client.close()


def at_once(*logins: Callable[[threading.Barrier], Login]) -> list[Login]:
    """Runs the logins side by side, each sent when all are connected."""
    ready = threading.Barrier(len(logins))
    with concurrent.futures.ThreadPoolExecutor(len(logins)) as pool:
        futures = [pool.submit(login, ready) for login in logins]
        return [future.result(timeout=60) for future in futures]


def is_pop3_ok(login: Login) -> bool:
    return isinstance(login.reply, bytes) and login.reply.startswith(b"+OK Logged in")


def is_pop3_auth_err(login: Login) -> bool:
    return isinstance(login.reply, bytes) and login.reply.startswith(b"-ERR [AUTH]")


def test_failures_for_a_user_from_one_address_do_not_lock_it_out_elsewhere(
    mail_server: ServerFactory, certs: Certs, dns: DNSServer, sink: Sink, tmp_path: Path
) -> None:
    """Issue 16: MAX_FAILURES wrong passwords for alice from 127.0.0.1, over SMTP AUTH and
    POP3, used to make alice get 454 / -ERR [AUTH] from every address (built-in limits). The
    guesses go at once, so none waits for the address's back-off."""
    own = mail_server(
        settings=submission_settings(certs, write_users(tmp_path / "users"), dns, sink),
        services=("submission", "pop3"),
    )
    smtp, pop = MAX_FAILURES // 2, MAX_FAILURES - MAX_FAILURES // 2
    results = at_once(
        *[partial(smtp_login, own, certs, "127.0.0.1", "alice", f"guess{n}") for n in range(smtp)],
        *[partial(pop3_login, own, "127.0.0.1", "alice", f"guess{n}") for n in range(pop)],
    )
    assert [r.reply for r in results[:smtp]] == [535] * smtp
    assert all(is_pop3_auth_err(r) for r in results[smtp:]), results
    own.wait_for_log(r"login failed \(auth failed\): user=<alice>", count=pop)
    assert smtp_login(own, certs, "127.0.0.2", "alice", PASSWORDS["alice"]).reply == 235
    assert is_pop3_ok(pop3_login(own, "127.0.0.2", "alice", PASSWORDS["alice"]))


#: Spellings of alice that normalise to her name (NFKC, strip, lower case).
SPELLINGS = (" alice", "alice\xa0", "\u2003alice", "ALICE", "\uff41lice")


def test_failed_logins_block_the_pair_and_back_off_the_address(
    mail_server: ServerFactory, certs: Certs, dns: DNSServer, sink: Sink, tmp_path: Path
) -> None:
    """Over SMTP AUTH and POP3: every spelling of alice counts against the one pair
    (127.0.0.1, alice); once it is full alice is refused from there in any spelling, even with
    the right password, while the address is under its own threshold (bob logs in from it) and
    alice logs in from 127.0.0.2. Each attempt from the failing address first waits its
    back-off, `auth_failure_delay` doubled per failure up to 7.5 times (Dovecot: 2, 4, 8, 15 s).
    Too many failures from one address for any users block the address."""
    delay = 0.2  # the back-off lapses after 14.5 times this: ample for a TLS handshake
    limits = {"auth_failures": 4, "auth_address_failures": 8, "auth_failure_delay": delay}
    settings = submission_settings(certs, write_users(tmp_path / "users"), dns, sink)
    own = mail_server(settings=merge(settings, {"limits": limits}), services=("submission", "pop3"))
    alice = PASSWORDS["alice"]

    # four wrong passwords for alice from 127.0.0.1, in four spellings, on both protocols
    assert smtp_login(own, certs, "127.0.0.1", SPELLINGS[0], "wrong").reply == 535
    assert is_pop3_auth_err(pop3_login(own, "127.0.0.1", SPELLINGS[1], "wrong"))
    assert smtp_login(own, certs, "127.0.0.1", SPELLINGS[2], "wrong").reply == 535
    assert is_pop3_auth_err(pop3_login(own, "127.0.0.1", SPELLINGS[3], "wrong"))

    # the pair is blocked for every spelling and the right password; the address is not
    smtp_blocked, pop3_blocked, bob, smtp_elsewhere, pop3_elsewhere = at_once(
        partial(smtp_login, own, certs, "127.0.0.1", SPELLINGS[4], alice),
        partial(pop3_login, own, "127.0.0.1", "alice", alice),
        partial(smtp_login, own, certs, "127.0.0.1", "bob", PASSWORDS["bob"]),
        partial(smtp_login, own, certs, "127.0.0.2", SPELLINGS[0], alice),
        partial(pop3_login, own, "127.0.0.2", SPELLINGS[4], alice),
    )
    assert smtp_blocked.reply == 454 and is_pop3_auth_err(pop3_blocked)
    assert bob.reply == 235
    assert smtp_elsewhere.reply == 235 and is_pop3_ok(pop3_elsewhere)
    # four failures in a row from 127.0.0.1: its attempts wait 7.5 delays before any answer
    for login in (smtp_blocked, pop3_blocked, bob):
        assert login.took >= 7.5 * delay, login
    own.wait_for_log(r"SASL PLAIN authentication blocked for alice@localhost: too many failures")
    own.wait_for_log(r"login failed \(blocked\): user=<alice>, method=USER, rip=127\.0\.0\.1")
    own.wait_for_log(r"sasl_method=PLAIN, sasl_username=alice@localhost$")

    # eight failures from 127.0.0.3 for eight users: the address is blocked, for anyone
    guesses = at_once(
        *[partial(smtp_login, own, certs, "127.0.0.3", f"user{n}", "wrong") for n in range(8)]
    )
    assert [g.reply for g in guesses] == [535] * 8
    smtp_blocked, pop3_blocked = at_once(
        partial(smtp_login, own, certs, "127.0.0.3", "bob", PASSWORDS["bob"]),
        partial(pop3_login, own, "127.0.0.3", "carol", PASSWORDS["carol"]),
    )
    assert smtp_blocked.reply == 454 and is_pop3_auth_err(pop3_blocked)
    assert smtp_login(own, certs, "127.0.0.2", "bob", PASSWORDS["bob"]).reply == 235


# ---------------------------------------------------------------------- 4. limits


def wait_all_disconnected(server: MailServer, timeout: float = 10.0) -> None:
    """Until the server has logged a disconnect for every connect (it counts no session)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = server.log_lines()
        connects = sum(1 for line in lines if ": connect from " in line)
        if connects == sum(1 for line in lines if ": disconnect from " in line):
            return
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.02)


def test_limits_not_shown_elsewhere(mail_server: ServerFactory) -> None:
    """Each limit gives its documented reply (config.Limits). Per-IP limits are per source
    address, so each check talks from its own loopback address."""
    limited = mail_server(
        settings={
            "local_users": ["postmaster"],
            "limits": {
                "connections": 4,
                "connection_rate": 3,
                "message_rate": 2,
                "commands_per_session": 12,
            },
        }
    )
    host, port = limited.host, limited.smtp_port

    def greeted(source: str) -> SourceClient:
        client = SourceClient(host, port, source)
        code, text = client.reply()
        assert code == 220, (source, code, text)
        return client

    # connection_rate: a 4th connection in the same minute gets 421 4.7.0 and is closed
    for _ in range(3):
        greeted("127.0.0.20").close()
    with SourceClient(host, port, "127.0.0.20") as client:
        code, text = client.reply()
        assert code == 421 and text[0].startswith("4.7.0") and "slow down" in text[0], text
        assert client.is_closed_by_peer()
    # message_rate: a 3rd MAIL in the same minute gets 450 4.7.1; the session goes on
    with greeted("127.0.0.21") as client:
        assert client.command("EHLO client.test")[0] == 250
        for _ in range(2):
            assert client.command("MAIL FROM:<x@example.org>")[0] == 250
            assert client.command("RSET")[0] == 250
        code, text = client.command("MAIL FROM:<x@example.org>")
        assert code == 450 and text[0].startswith("4.7.1"), text
        assert client.command("NOOP")[0] == 250
    # commands_per_session: the 13th command gets 421 4.7.0 and the session ends
    with greeted("127.0.0.22") as client:
        for _ in range(12):
            assert client.command("NOOP")[0] == 250
        code, text = client.command("NOOP")
        assert code == 421 and text[0].startswith("4.7.0") and "too many commands" in text[0]
        assert client.is_closed_by_peer()
    # forbid_unauth_pipelining (on by default): pipelining past EHLO ends the session
    with greeted("127.0.0.23") as client:
        client.send(b"EHLO client.test\r\nMAIL FROM:<x@example.org>\r\n")
        code, text = client.reply()
        assert code == 554 and text[0].startswith("5.5.0"), text
        assert client.is_closed_by_peer()
    # connections: with 4 sessions open (from 4 addresses), a 5th gets 421 4.7.0
    wait_all_disconnected(limited)
    held = [greeted(f"127.0.0.{n}") for n in range(30, 34)]
    try:
        with SourceClient(host, port, "127.0.0.34") as client:
            code, text = client.reply()
            assert code == 421 and text[0].startswith("4.7.0"), text
            assert "too many connections" in text[0], text
            assert client.is_closed_by_peer()
    finally:
        for client in held:
            client.close()


# ---------------------------------------------------------------------- 5. SIGHUP


def test_sighup_reloads_the_certificate_and_the_users_file(
    mail_server: ServerFactory,
    certs: Certs,
    dns: DNSServer,
    sink: Sink,
    tmp_path: Path,
) -> None:
    """`kill -HUP`: new connections get the new certificate (old sessions keep theirs), and a
    users file named by the new configuration is the one AUTH checks."""
    chain = tmp_path / "live.pem"
    shutil.copyfile(certs.chain_file, chain)
    settings = submission_settings(certs, write_users(tmp_path / "users"), dns, sink)
    settings["tls"] = {"cert": str(chain), "key": str(chain)}
    own = mail_server(settings=settings, services=("submissions", "pop3s"))
    port = own.port("submissions")

    def login(context: ssl.SSLContext, user: str, password: str) -> None:
        with smtplib.SMTP_SSL(own.host, port, context=context, timeout=20) as smtp:
            smtp.login(user, password)

    login(certs.client_context(), "alice", PASSWORDS["alice"])
    new_ca = trustme.CA()
    new_ca.issue_cert("mx.test", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(chain)
    )
    new_context = ssl.create_default_context()
    new_ca.configure_trust(new_context)
    other_users = UserDB(tmp_path / "other-users", hasher=FAST_HASHER)
    other_users.add("dave", "n3w user")
    own.update_config({"users_file": str(other_users.path)})
    own.reload()
    own.wait_for_log(r"reload: configuration .* applied")
    login(new_context, "dave", "n3w user")
    with pytest.raises(ssl.SSLCertVerificationError):
        login(certs.client_context(), "alice", PASSWORDS["alice"])
    # POP3 logins check the reloaded users file too, over the reloaded certificate
    pop = poplib.POP3_SSL(own.host, own.port("pop3s"), context=new_context, timeout=20)
    try:
        pop.user("dave")
        assert pop.pass_("n3w user").startswith(b"+OK")
    finally:
        pop.quit()
