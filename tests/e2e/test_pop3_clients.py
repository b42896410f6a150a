"""Real POP3 clients nobody here wrote, against our server on loopback; Dovecot as an oracle.

Clients: Python's poplib (plain on loopback, STLS, implicit TLS, APOP refused), mpop and
fetchmail (Debian) downloading over STLS with certificate verification into a Maildir and
deleting on the server. The server runs in this event loop; blocking clients run in a thread or
as asyncio subprocesses, so the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import os
import poplib
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.pop3d.pop3_fixtures import Certs, deliver, make_users, running_server

from mailhaven.mailbox.users import UserDB

# both_loops: every test runs its server on the standard library's loop and on uvloop
# (`event_loop = "uvloop"`), see tests/e2e/conftest.py
pytestmark = [pytest.mark.e2e, pytest.mark.both_loops]

MESSAGES = [
    b"From: a@example.test\nSubject: one\n\nfirst line\n.starts with a dot\n..two dots\n",
    b"Subject: CRLF stored\r\nX-Folded: a\r\n  b\r\n\r\nbody\r\n\r\nafter blank\r\n",
    b"Subject: headers only\n",
    b"Subject: no final newline\n\nlast line without LF",
    b"Subject: empty body\n\n",
    b"Subject: many\n\n" + b"".join(b"line %d\n" % i for i in range(30)),
]


def wire(message: bytes) -> bytes:
    """The message as RETR must deliver it (before dot-stuffing): CRLF lines."""
    return message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@pytest.fixture(autouse=True)
async def on_the_chosen_loop(request: pytest.FixtureRequest) -> None:
    """Proof that the test really runs on the loop its id names (`[asyncio]`, `[uvloop]`)."""
    package = type(asyncio.get_running_loop()).__module__.partition(".")[0]
    assert f"[{package}]" in request.node.name, (package, request.node.name)


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


@pytest.fixture
def users(tmp_path: Path) -> UserDB:
    return make_users(tmp_path, alice="secret")


@pytest.fixture
def mail_root(tmp_path: Path) -> Path:
    for i, message in enumerate(MESSAGES):
        deliver(tmp_path / "mail" / "alice", message, when=1700000000 + i)
    return tmp_path / "mail"


def maildir_messages(maildir: Path) -> list[bytes]:
    paths = [p for sub in ("new", "cur") for p in (maildir / sub).iterdir()]
    return sorted(p.read_bytes() for p in paths)


def retr(client: poplib.POP3, n: int) -> bytes:
    _, lines, _ = client.retr(n)  # poplib undoes dot-stuffing
    return b"".join(line + b"\r\n" for line in lines)


# ----------------------------------------------------------------------------------- poplib
async def test_poplib_plaintext_on_loopback_byte_for_byte(users: UserDB, mail_root: Path) -> None:
    maildir = mail_root / "alice"

    def session(port: int) -> None:
        client = poplib.POP3("127.0.0.1", port, timeout=10)
        assert set(client.capa()) >= {"TOP", "UIDL", "USER", "SASL", "PIPELINING", "RESP-CODES"}
        client.user("alice")
        client.pass_("secret")
        count, octets = client.stat()
        assert (count, octets) == (len(MESSAGES), sum(len(wire(m)) for m in MESSAGES))
        for n, message in enumerate(MESSAGES, 1):
            expected = wire(message)
            if not expected.endswith(b"\r\n"):
                expected += b"\r\n"
            assert retr(client, n) == expected
        client.dele(1)
        client.quit()

    async with running_server(mail_root, users) as server:
        await asyncio.to_thread(session, server.port)
    remaining = sorted(p.name for p in (maildir / "cur").iterdir())
    assert len(remaining) == len(MESSAGES) - 1 and all(n.endswith(":2,S") for n in remaining)
    assert not list((maildir / "new").iterdir())


async def test_poplib_stls_verified_and_apop_refused(
    users: UserDB, mail_root: Path, certs: Certs
) -> None:
    def session(port: int) -> None:
        client = poplib.POP3("127.0.0.1", port, timeout=10)
        with pytest.raises(poplib.error_proto, match="APOP not supported"):
            client.apop("alice", "secret")  # our greeting carries no timestamp
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Plaintext"):
            client.user("alice")
        client.stls(certs.client_context())
        assert isinstance(client.sock, ssl.SSLSocket)
        client.user("alice")
        client.pass_("secret")
        assert client.stat()[0] == len(MESSAGES)
        client.quit()

    async with running_server(mail_root, users, tls_context=certs.server_context(),
                              allow_plaintext_on_loopback=False) as server:
        await asyncio.to_thread(session, server.port)


async def test_raw_apop_is_refused(users: UserDB, mail_root: Path) -> None:
    async with running_server(mail_root, users) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert b"<" not in await reader.readline()  # no APOP timestamp in the greeting
        writer.write(b"APOP alice 0123456789abcdef0123456789abcdef\r\n")
        assert await asyncio.wait_for(reader.readline(), 10) == b"-ERR APOP is not supported\r\n"
        writer.close()


async def test_poplib_implicit_tls(users: UserDB, mail_root: Path, certs: Certs) -> None:
    def session(port: int) -> None:
        client = poplib.POP3_SSL("localhost", port, context=certs.client_context(), timeout=10)
        client.user("alice")
        client.pass_("secret")
        assert client.uidl()[1][0].startswith(b"1 1700000000.")
        client.quit()

    async with running_server(mail_root, users, tls_context=certs.server_context(),
                              implicit_tls=True, allow_plaintext_on_loopback=False) as server:
        await asyncio.to_thread(session, server.port)


async def test_poplib_second_session_refused(users: UserDB, mail_root: Path) -> None:
    def sessions(port: int) -> None:
        first = poplib.POP3("127.0.0.1", port, timeout=10)
        first.user("alice")
        first.pass_("secret")
        second = poplib.POP3("127.0.0.1", port, timeout=10)
        second.user("alice")
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            second.pass_("secret")
        first.quit()
        second.close()

    async with running_server(mail_root, users) as server:
        await asyncio.to_thread(sessions, server.port)


KILLED_CLIENT = """
import poplib, sys, time
client = poplib.POP3("127.0.0.1", int(sys.argv[1]), timeout=10)
client.user("alice"); client.pass_("secret")
for n in range(1, client.stat()[0] + 1):
    client.dele(n)
print("deleted", flush=True)
time.sleep(60)
"""


async def test_killing_the_client_mid_session_deletes_nothing(
    users: UserDB, mail_root: Path
) -> None:
    before = maildir_messages(mail_root / "alice")
    async with running_server(mail_root, users) as server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", KILLED_CLIENT, str(server.port), stdout=subprocess.PIPE)
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"deleted\n"
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        for _ in range(100):  # wait until the server has seen the connection go
            if not server.sessions:
                break
            await asyncio.sleep(0.05)
        assert not server.sessions
    assert maildir_messages(mail_root / "alice") == before


# ---------------------------------------------------------------------- mpop and fetchmail
@pytest.mark.skipif(shutil.which("mpop") is None, reason="mpop not installed")
async def test_mpop_downloads_over_stls_into_maildir_and_deletes(
    tmp_path: Path, users: UserDB, mail_root: Path, certs: Certs
) -> None:
    out = tmp_path / "downloaded"
    for sub in ("tmp", "new", "cur"):
        (out / sub).mkdir(parents=True)
    async with running_server(mail_root, users, tls_context=certs.server_context(),
                              allow_plaintext_on_loopback=False) as server:
        proc = await asyncio.create_subprocess_exec(
            "mpop", "--host=127.0.0.1", f"--port={server.port}", "--timeout=20",
            "--tls=on", "--tls-starttls=on", f"--tls-trust-file={certs.ca_file}",
            "--auth=user", "--user=alice", "--passwordeval=echo secret",
            f"--delivery=maildir,{out}", "--keep=off", f"--uidls-file={tmp_path / 'uidls'}",
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, output.decode()
    got = sorted(_strip_trace(p.read_bytes()) for p in (out / "new").iterdir())
    assert got == sorted(_lf(m) for m in MESSAGES)
    assert maildir_messages(mail_root / "alice") == []


@pytest.mark.skipif(shutil.which("fetchmail") is None, reason="fetchmail not installed")
async def test_fetchmail_downloads_over_stls_with_certificate_check(
    tmp_path: Path, users: UserDB, mail_root: Path, certs: Certs
) -> None:
    out = tmp_path / "downloaded"
    for sub in ("tmp", "new", "cur"):
        (out / sub).mkdir(parents=True)
    mda = tmp_path / "mda.sh"
    mda.write_text(f"#!/bin/sh\nn=$(date +%s%N).$$\n"
                   f"cat > {out}/tmp/$n && mv {out}/tmp/$n {out}/new/$n\n")
    mda.chmod(0o755)
    async with running_server(mail_root, users, tls_context=certs.server_context(),
                              allow_plaintext_on_loopback=False) as server:
        rc = tmp_path / "fetchmailrc"
        # fetchmail checks names, not IP SANs: poll "localhost" via the loopback address.
        rc.write_text(
            f"set no syslog\n"
            f"poll localhost via 127.0.0.1 protocol pop3 port {server.port} timeout 20\n"
            f'  user "alice" there with password "secret" is "root" here\n'
            f'  sslproto "TLS1.2+" sslcertck sslcommonname "localhost" '
            f'sslcertfile "{certs.ca_file}"\n'
            f'  nokeep mda "{mda}"\n')
        rc.chmod(0o600)
        proc = await asyncio.create_subprocess_exec(
            "fetchmail", "-f", str(rc), "--nodetach", "--pidfile", str(tmp_path / "pid"),
            env={**os.environ, "HOME": str(tmp_path), "FETCHMAILHOME": str(tmp_path)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, output.decode()
    got = sorted(_strip_trace(p.read_bytes()) for p in (out / "new").iterdir())
    # fetchmail ends a header-only message with the empty line that separates headers from body
    assert got == sorted(_lf(m, separator=True) for m in MESSAGES)
    assert maildir_messages(mail_root / "alice") == []


def _lf(message: bytes, *, separator: bool = False) -> bytes:
    body = message.replace(b"\r\n", b"\n")
    body = body if body.endswith(b"\n") else body + b"\n"
    return body + b"\n" if separator and b"\n\n" not in body else body


def _strip_trace(message: bytes) -> bytes:
    """Drop the Received: header (and its continuation lines) a retriever prepends."""
    lines = message.split(b"\n")
    assert lines[0].startswith(b"Received: ")
    i = 1
    while lines[i][:1] in (b" ", b"\t"):
        i += 1
    return b"\n".join(lines[i:])


# ------------------------------------------------------------------------ Dovecot as oracle
DOVECOT_POP3 = Path("/usr/lib/dovecot/pop3")
ORACLE_COMMANDS = ["STAT", "LIST", *(f"LIST {n}" for n in range(1, len(MESSAGES) + 2)),
                   "UIDL", *(f"TOP {n} {m}" for n in range(1, len(MESSAGES) + 1)
                             for m in (0, 1, 2, 100)),
                   *(f"RETR {n}" for n in range(1, len(MESSAGES) + 1))]


@pytest.fixture
def shared_maildir() -> Iterator[Path]:
    """A Maildir outside pytest's 0700 tmp tree, readable by the unprivileged Dovecot user."""
    top = Path(tempfile.mkdtemp(prefix="mailhaven-oracle-"))
    os.chmod(top, 0o755)
    try:
        for i, message in enumerate(MESSAGES):
            deliver(top / "mail" / "alice", message, when=1700000000 + i)
        if os.geteuid() == 0:
            shutil.chown(top, "nobody")
            for path in top.rglob("*"):
                shutil.chown(path, "nobody")
        yield top / "mail"
    finally:
        shutil.rmtree(top, ignore_errors=True)


def dovecot_transcript(maildir: Path, commands: list[str]) -> list[bytes]:
    prefix = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    env = ["env", "-i", f"HOME={maildir}", "USER=alice"]
    proc = subprocess.run(
        [*prefix, *env, str(DOVECOT_POP3), "-o", f"mail_location=maildir:{maildir}",
         "-o", "pop3_uidl_format=%f"],
        input="".join(f"{c}\r\n" for c in [*commands, "QUIT"]).encode(),
        capture_output=True, timeout=30, check=True)
    return responses(proc.stdout, commands, greeting=False)


def responses(data: bytes, commands: list[str], *, greeting: bool) -> list[bytes]:
    """Split a transcript into one response per command (multi-line ones up to `.`)."""
    lines = data.split(b"\r\n")
    if greeting:
        lines.pop(0)
    multi = {"LIST", "UIDL"}
    out: list[bytes] = []
    for command in commands:
        first = lines.pop(0)
        block = [first.split(b" ")[0] if command.startswith(("RETR", "TOP")) else first]
        if first.startswith(b"+OK") and (command in multi or command.startswith(("TOP", "RETR"))):
            while (line := lines.pop(0)) != b".":
                block.append(line)
        out.append(b"\n".join(block))
    return out


@pytest.mark.skipif(not DOVECOT_POP3.exists(), reason="dovecot-pop3d not installed")
async def test_dovecot_agrees_on_stat_list_uidl_top_retr(
    tmp_path: Path, users: UserDB, shared_maildir: Path
) -> None:
    async with running_server(shared_maildir, users) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        await reader.readline()
        script = ["USER alice", "PASS secret", *ORACLE_COMMANDS, "QUIT"]
        writer.write("".join(f"{c}\r\n" for c in script).encode())  # PIPELINING
        ours_raw = await asyncio.wait_for(reader.read(), 30)
        writer.close()
    ours = responses(ours_raw, ["USER", "PASS", *ORACLE_COMMANDS], greeting=False)[2:]
    theirs = await asyncio.to_thread(dovecot_transcript, shared_maildir / "alice",
                                     ORACLE_COMMANDS)
    assert len(theirs) == len(ORACLE_COMMANDS)
    assert theirs[0] == ours[0] == f"+OK {len(MESSAGES)} {sum(map(len, map(wire, MESSAGES)))}".encode()
    for command, mine, dovecot in zip(ORACLE_COMMANDS, ours, theirs, strict=True):
        if command in ("STAT", "LIST") or command.startswith(("UIDL", "TOP", "RETR")):
            # Free text after "+OK" differs by design; compare the data.
            mine_data = mine.split(b"\n")[1:] if b"\n" in mine else [mine.split(b" ")[1:]]
            their_data = dovecot.split(b"\n")[1:] if b"\n" in dovecot else [dovecot.split(b" ")[1:]]
            assert mine_data == their_data, (command, mine, dovecot)
        else:  # LIST n: "+OK n size" in both, or -ERR in both
            assert mine.split(b" ")[:3] == dovecot.split(b" ")[:3] or (
                mine.startswith(b"-ERR") and dovecot.startswith(b"-ERR")), (command, mine, dovecot)
