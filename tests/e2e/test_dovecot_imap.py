"""IMAP through a real Dovecot on mailhaven's Maildirs: virtual domains, shared ownership.

mailhaven (SMTP in, POP3) and a private Dovecot (`dovecot-imapd`, `dovecot-pop3d`, run from
contrib/dovecot/dovecot.conf by `tests.support.dovecot`) share one users file and one mail
root. The mail user is `nobody`/`nogroup` (Dovecot refuses uid 0 for mail); the users file is
0640 root:dovecot so Dovecot's auth process (user `dovecot`) reads it. Everything listens on
127.0.0.1; both processes are stopped by PID.

What is shown: users added with `mailhaven user add alice@a.example` log in to Dovecot IMAP with
their full address in any case; alice@a.example and alice@b.example are two mailboxes; a message
delivered over SMTP is seen over IMAP, moved to a folder and flagged seen; mailhaven's POP3 then
lists what is left with the UIDLs it gave before, which are also Dovecot POP3's; the files are
the mail user's; `user passwd` keeps Dovecot's read access; POP3 DELE+QUIT while Dovecot
IMAP expunges the same messages ends with both deletions applied and no error, also when the
QUIT and the EXPUNGE are sent at the same instant, round after round; and a folder
made with IMAP CREATE receives the user's plus-addressed mail (`[folders] plus_address`).
"""

from __future__ import annotations

import contextlib
import grp
import imaplib
import os
import poplib
import pwd
import shutil
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
from tests.e2e.conftest import ServerFactory
from tests.support import dovecot as dc
from tests.support.server import MailServer

pytestmark = [
    pytest.mark.skipif(not dc.available(), reason="dovecot-imapd is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a private Dovecot needs root to switch users"),
]

PASSWORDS = {"alice@a.example": "alice-a pw", "alice@b.example": "alice-b pw"}
MAIL_USER, MAIL_GROUP = "nobody", "nogroup"


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory both daemons can reach (pytest's tmp tree is root's 0700)."""
    top = Path(tempfile.mkdtemp(prefix="mailhaven-dovecot-"))
    os.chmod(top, 0o755)
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def add_user(server: MailServer, name: str, password: str, *, command: str = "add") -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mailhaven", "user", command, name, "-c", str(server.config_path)],
        input=password + "\n", capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture
def both(mail_server: ServerFactory, shared: Path, tmp_path: Path
         ) -> Iterator[tuple[MailServer, dc.Dovecot]]:
    users = shared / "users.passwd"
    server = mail_server(
        start=False,
        services=("smtp", "pop3"),
        settings={
            "local_domains": ["a.example", "b.example"],
            "recipient_delimiter": "+",
            "users_file": str(users),
            "mailbox": {
                "mail_dir": str(shared / "mail"), "mail_user": MAIL_USER,
                "mail_group": MAIL_GROUP, "dir_mode": 0o770, "file_mode": 0o660,
                "users_file_mode": 0o640, "users_file_group": "dovecot",
            },
        },
    )
    for name, password in PASSWORDS.items():
        add_user(server, name, password)
    server.start()
    dovecot = dc.Dovecot(tmp_path / "dovecot", users_file=users, mail_dir=shared / "mail",
                         mail_user=MAIL_USER, mail_group=MAIL_GROUP)
    with dovecot:
        yield server, dovecot


@contextlib.contextmanager
def imap(dovecot: dc.Dovecot, user: str, password: str) -> Iterator[imaplib.IMAP4]:
    client = imaplib.IMAP4("127.0.0.1", dovecot.imap_port, timeout=20)
    try:
        client.login(user, password)
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.logout()


def pop3(server: MailServer, user: str, password: str, port: int | None = None) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", port or server.port("pop3"), timeout=20)
    client.user(user)
    client.pass_(password)
    return client


def uidls(client: poplib.POP3) -> list[str]:
    return [line.decode().split()[1] for line in client.uidl()[1]]


def test_imap_and_pop3_share_the_maildirs(both: tuple[MailServer, dc.Dovecot]) -> None:
    server, dovecot = both
    for n in range(3):
        server.send_test_message("alice@a.example", f"a{n}")
    server.send_test_message("ALICE@B.EXAMPLE", "b0")
    server.wait_for_messages("alice@a.example", 3)
    server.wait_for_messages("alice@b.example", 1)

    before = pop3(server, "alice@a.example", PASSWORDS["alice@a.example"])
    first = uidls(before)
    before.quit()
    assert len(first) == 3

    # the full address in any case; a.example's alice is not b.example's
    with imap(dovecot, "Alice@A.Example", PASSWORDS["alice@a.example"]) as client:
        assert client.select("INBOX")[1] == [b"3"]
        _, data = client.fetch("1:3", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        subjects = sorted(part[1].strip() for part in data if isinstance(part, tuple))
        assert subjects == [b"Subject: a0", b"Subject: a1", b"Subject: a2"]
        _, data = client.fetch("1", "(UID)")
        uid = data[0].decode().split("UID ")[1].rstrip(")")  # type: ignore[union-attr]
        assert client.uid("MOVE", uid, "Archive")[0] == "OK"  # RFC 6851
        assert client.store("1", "+FLAGS", "\\Seen")[0] == "OK"  # was 2 before the move
        client.expunge()
    with imap(dovecot, "alice@b.example", PASSWORDS["alice@b.example"]) as client:
        assert client.select("INBOX")[1] == [b"1"]
    with pytest.raises(imaplib.IMAP4.error), imap(dovecot, "alice@a.example",
                                                  PASSWORDS["alice@b.example"]):
        pass

    # mailhaven's POP3 afterwards: what is left, under the UIDLs it gave before
    after = pop3(server, "ALICE@a.example", PASSWORDS["alice@a.example"])
    left = uidls(after)
    assert len(left) == 2 and left == first[1:]
    assert after.retr(1)[1][-1] == b"hi"
    after.quit()
    # Dovecot's POP3 (pop3_uidl_format = %f) gives the same UIDLs
    theirs = pop3(server, "alice@a.example", PASSWORDS["alice@a.example"], dovecot.pop3_port)
    assert uidls(theirs) == left
    theirs.quit()

    # the moved message lives in a Maildir++ folder; every file is the mail user's
    box = server.maildir("alice@a.example")
    archived = [p for sub in ("new", "cur") for p in (box / ".Archive" / sub).iterdir()]
    assert len(archived) == 1 and b"Subject: a0" in archived[0].read_bytes()
    uid, gid = pwd.getpwnam(MAIL_USER).pw_uid, grp.getgrnam(MAIL_GROUP).gr_gid
    for path in (box / "new").iterdir():
        st = path.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, 0o660)
    assert (box.stat().st_uid, stat.S_IMODE(box.stat().st_mode)) == (uid, 0o770)
    assert "Error" not in dovecot.logs().replace("auth failed", "")


def test_user_passwd_keeps_dovecots_access(both: tuple[MailServer, dc.Dovecot]) -> None:
    server, dovecot = both
    users = Path(server.config["users_file"])
    st = users.stat()
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (grp.getgrnam("dovecot").gr_gid, 0o640)
    add_user(server, "alice@a.example", "changed pw", command="passwd")
    st = users.stat()
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (grp.getgrnam("dovecot").gr_gid, 0o640)
    with imap(dovecot, "alice@a.example", "changed pw") as client:
        assert client.select("INBOX")[0] == "OK"
    pop3(server, "alice@a.example", "changed pw").quit()


def test_pop3_delete_while_imap_expunges(both: tuple[MailServer, dc.Dovecot]) -> None:
    """One POP3 session holds its snapshot while Dovecot flags every message (renaming the
    files into cur/) and expunges m1 and m2; POP3 then reads m3 (moved meanwhile), deletes m0
    and m1 and QUITs: +OK, and m0, m1, m2 are gone, m3 and m4 stay. Messages are picked by
    subject: the two servers need not number them alike."""
    server, dovecot = both
    for n in range(5):
        server.send_test_message("alice@a.example", f"m{n}")
    server.wait_for_messages("alice@a.example", 5)
    password = PASSWORDS["alice@a.example"]
    session = pop3(server, "alice@a.example", password)
    numbers = {subject(session, n): n for n in range(1, 6)}
    uid_of = dict(zip(range(1, 6), uidls(session), strict=True))
    with imap(dovecot, "alice@a.example", password) as client:
        client.select("INBOX")
        assert client.store("1:5", "+FLAGS", "\\Seen")[0] == "OK"
        for gone in ("m1", "m2"):
            _, found = client.search(None, "SUBJECT", gone)
            assert client.store(found[0].decode(), "+FLAGS", "\\Deleted")[0] == "OK"
        client.expunge()
        assert session.retr(numbers["m3"])[1][-1] == b"hi"  # found again after the rename
        session.dele(numbers["m0"])
        session.dele(numbers["m1"])  # already expunged by IMAP: deleting it again is no error
        assert session.quit().startswith(b"+OK")
    check = pop3(server, "alice@a.example", password)
    assert sorted(uidls(check)) == sorted(uid_of[numbers[s]] for s in ("m3", "m4"))
    check.quit()
    with imap(dovecot, "alice@a.example", password) as client:
        client.select("INBOX")
        _, data = client.search(None, "ALL")
        assert len(data[0].split()) == 2
    server.wait_for_log(r"logout: user=<alice@a\.example>, reason=QUIT, .*del=2/5")


#: The race below: rounds, and the time after which no new round starts.
RACE_ROUNDS, RACE_SECONDS = 5, 60.0


def test_pop3_quit_races_imap_expunge(both: tuple[MailServer, dc.Dovecot]) -> None:
    """Each round: six new messages; POP3 marks r0-r3 deleted, IMAP flags r2-r4 \\Deleted,
    then a barrier releases POP3's QUIT and IMAP's EXPUNGE together (r2 and r3 are deleted by
    both). Both must answer OK, and afterwards mailhaven's POP3 and Dovecot's IMAP both see
    exactly the r5 of every round so far: nothing lost, nothing back from the dead."""
    server, dovecot = both
    password = PASSWORDS["alice@a.example"]
    kept: list[str] = []
    deadline = time.monotonic() + RACE_SECONDS
    for round_ in range(RACE_ROUNDS):
        if round_ >= 2 and time.monotonic() > deadline:
            break
        names = [f"x{round_}r{n}" for n in range(6)]
        for name in names:
            server.send_test_message("alice@a.example", name)
        server.wait_for_messages("alice@a.example", len(kept) + 6)
        session = pop3(server, "alice@a.example", password)
        numbers = {subject(session, n): n for n in range(1, session.stat()[0] + 1)}
        for name in names[:4]:
            session.dele(numbers[name])
        client = imaplib.IMAP4("127.0.0.1", dovecot.imap_port, timeout=20)
        client.login("alice@a.example", password)
        client.select("INBOX")
        found = [client.search(None, "SUBJECT", name)[1][0].decode() for name in names[2:5]]
        assert client.store(",".join(found), "+FLAGS", "\\Deleted")[0] == "OK"
        quit_reply, (expunged, _) = at_once(session.quit, client.expunge)
        client.logout()
        assert isinstance(quit_reply, bytes) and quit_reply.startswith(b"+OK"), quit_reply
        assert expunged == "OK", expunged
        kept.append(names[5])

        check = pop3(server, "alice@a.example", password)
        seen_by_pop3 = sorted(subject(check, n) for n in range(1, check.stat()[0] + 1))
        check.quit()
        with imap(dovecot, "alice@a.example", password) as fresh:
            count = int(fresh.select("INBOX")[1][0] or 0)
            seen_by_imap = sorted(
                part[1].decode().strip()[9:]
                for part in fresh.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")[1]
                if isinstance(part, tuple)
            ) if count else []
        assert seen_by_pop3 == seen_by_imap == sorted(kept), round_
    assert "Traceback" not in server.log_path.read_text()
    assert "Error" not in dovecot.logs()


def at_once(*actions: Callable[[], object]) -> list[object]:
    """Run `actions` in threads released together by a barrier; their results (bounded)."""
    results: list[object] = [None] * len(actions)
    barrier = threading.Barrier(len(actions), timeout=20)

    def run(index: int) -> None:
        barrier.wait()
        results[index] = actions[index]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(actions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    return results


def subject(client: poplib.POP3, number: int) -> str:
    lines = client.top(number, 0)[1]
    return next(line.decode()[9:] for line in lines if line.startswith(b"Subject: "))


def test_a_pop3_login_before_any_mail_makes_a_maildir_dovecot_opens(
    both: tuple[MailServer, dc.Dovecot],
) -> None:
    server, dovecot = both
    add_user(server, "carol@b.example", "carol pw")
    pop3(server, "carol@b.example", "carol pw").quit()  # makes b.example/carol/
    box = server.maildir("carol@b.example")
    uid = pwd.getpwnam(MAIL_USER).pw_uid
    for path in (box, box / "new", box / "mailhaven-pop3.lock"):
        assert path.stat().st_uid == uid, path
    with imap(dovecot, "carol@b.example", "carol pw") as client:
        assert client.select("INBOX") == ("OK", [b"0"])
        assert client.create("Lists")[0] == "OK"  # Dovecot may write in it
    server.send_test_message("carol@b.example", "after")
    (got,) = server.wait_for_messages("carol@b.example", 1)
    assert got.stat().st_uid == uid


def test_plus_address_delivers_into_a_folder_made_over_imap(
    both: tuple[MailServer, dc.Dovecot],
) -> None:
    """alice+lists@ goes to the folder `lists` that alice made with IMAP CREATE; an extension
    naming no folder goes to the INBOX; with `[folders] plus_address = false` (a reload) every
    extension goes to the INBOX."""
    server, dovecot = both
    password = PASSWORDS["alice@a.example"]
    with imap(dovecot, "alice@a.example", password) as client:
        assert client.create("lists")[0] == "OK"
    server.send_test_message("alice+lists@a.example", "for the list")  # direct delivery: in before the 250
    server.send_test_message("alice+nosuch@a.example", "no such folder")
    (inbox,) = server.wait_for_messages("alice@a.example", 1)
    assert b"Subject: no such folder" in inbox.read_bytes()
    (listed,) = server.messages("alice@a.example", folder="lists")
    assert b"Subject: for the list" in listed.read_bytes()
    with imap(dovecot, "alice@a.example", password) as client:
        assert client.select("lists")[1] == [b"1"]
        _, data = client.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert data[0][1].strip() == b"Subject: for the list"  # type: ignore[index]
        assert client.select("INBOX")[1] == [b"1"]

    server.update_config({"folders": {"plus_address": False}})
    server.reload()
    server.wait_for_log(r"reload: configuration .* applied")
    server.send_test_message("alice+lists@a.example", "plus folders off")
    got = server.wait_for_messages("alice@a.example", 2)
    assert any(b"Subject: plus folders off" in path.read_bytes() for path in got)
    assert len(server.messages("alice@a.example", folder="lists")) == 1
    with imap(dovecot, "alice@a.example", password) as client:
        assert client.select("lists")[1] == [b"1"]
        assert client.select("INBOX")[1] == [b"2"]
    assert "Traceback" not in server.log_path.read_text()


def test_dovecot_serves_mailhavens_certificate_and_reloads_it(
    mail_server: ServerFactory, shared: Path, tmp_path: Path
) -> None:
    """contrib's ssl_cert/ssl_key name mailhaven's certificate files, with `ssl = required`:
    IMAP STARTTLS and mailhaven's POP3 STLS show the same certificate. After a renewal
    mailhaven's reload serves the new one while Dovecot keeps the old one until it is reloaded
    too (what docs/mailboxes.md tells the administrator to do)."""
    ca = trustme.CA()
    cert, key = shared / "cert.pem", shared / "key.pem"

    def install() -> bytes:
        """A renewal as an ACME client does it: key renamed into place, then the chain."""
        issued = ca.issue_cert("mail.a.example", "127.0.0.1")
        chain = b"".join(blob.bytes() for blob in issued.cert_chain_pems)
        for path, data in ((key, issued.private_key_pem.bytes()), (cert, chain)):
            path.with_suffix(".new").write_bytes(data)
            path.with_suffix(".new").replace(path)
        return ssl.PEM_cert_to_DER_cert(issued.cert_chain_pems[0].bytes().decode())

    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.check_hostname = False

    def imap_certificate() -> bytes | None:
        client = imaplib.IMAP4("127.0.0.1", dovecot.imap_port, timeout=20)
        try:
            client.starttls(ssl_context=context)
            return client.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined,no-any-return]
        finally:
            client.logout()

    def pop3_certificate() -> bytes | None:
        client = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=20)
        client.stls(context)
        try:
            return client.sock.getpeercert(binary_form=True)
        finally:
            client.quit()

    first = install()
    users = shared / "users.passwd"
    server = mail_server(start=False, services=("pop3",), settings={
        "local_domains": ["a.example"], "users_file": str(users),
        "tls": {"cert": str(cert), "key": str(key)},
        "mailbox": {"mail_dir": str(shared / "mail"), "mail_user": MAIL_USER,
                    "mail_group": MAIL_GROUP, "dir_mode": 0o770, "file_mode": 0o660,
                    "users_file_mode": 0o640, "users_file_group": "dovecot"},
    })
    add_user(server, "alice@a.example", PASSWORDS["alice@a.example"])
    server.start()
    with dc.Dovecot(tmp_path / "dovecot", users_file=users, mail_dir=shared / "mail",
                    mail_user=MAIL_USER, mail_group=MAIL_GROUP, tls=(cert, key)) as dovecot:
        assert imap_certificate() == pop3_certificate() == first
        client = imaplib.IMAP4("127.0.0.1", dovecot.imap_port, timeout=20)
        client.starttls(ssl_context=context)
        assert client.login("Alice@A.Example", PASSWORDS["alice@a.example"])[0] == "OK"
        client.logout()

        renewed = install()
        server.reload()
        server.wait_for_log(r"reload: configuration .* applied")
        assert pop3_certificate() == renewed
        assert imap_certificate() == first  # Dovecot read the files at start only
        dovecot.reload()
        deadline = time.monotonic() + 15
        while (seen := imap_certificate()) != renewed and time.monotonic() < deadline:
            time.sleep(0.2)
        assert seen == renewed
        assert "Error" not in dovecot.logs()
