"""Virtual domains end to end: real clients log in with the full address, each domain its own.

One `mailhaven serve` with local domains a.example and b.example (SMTP, submission with
STARTTLS, POP3 with STLS), users alice@a.example, alice@b.example and bob@b.example. Clients:
msmtp (submission, AUTH with the full address), mpop and fetchmail (POP3, full address in mixed
case), Python's smtplib/poplib for AUTH PLAIN, LOGIN-DELAY (over pop3 and pop3s) and hostile
login names; smtplib for per-domain aliases, catch-all and default quota. And a domain
removed from the configuration while mail for it is queued: held and logged, delivered once the
domain is back, never relayed away nor lost.
"""

from __future__ import annotations

import base64
import os
import poplib
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trustme
from argon2 import PasswordHasher
from tests.e2e.conftest import ServerFactory
from tests.support.server import MailServer

from mailhaven.mailbox.users import UserDB

FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
PASSWORDS = {"alice@a.example": "pw a", "alice@b.example": "pw b", "bob@b.example": "pw bob"}
DOMAINS = ["a.example", "b.example"]
HOSTILE = ["a/b@a.example", "../alice@a.example", "alice@a.example/..", "..", "x" * 300,
           "alice@../a.example", "alice"]  # "alice": two local domains make it ambiguous


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    cert.private_key_and_cert_chain_pem.write_to_path(str(directory / "server.pem"))
    return directory / "ca.pem", directory / "server.pem"


def settings(tmp_path: Path, chain: Path, **mailbox: object) -> dict[str, object]:
    users = UserDB(tmp_path / "users.passwd", hasher=FAST, domains=DOMAINS)
    for name, password in PASSWORDS.items():
        users.add(name, password)
    return {
        "local_domains": DOMAINS,
        "users_file": str(users.path),
        "tls": {"cert": str(chain), "key": str(chain)},
        "trusted_networks": [],
        "mailbox": mailbox,
        # hostile names fail on purpose, a dozen times: keep the tarpit short
        "limits": {"auth_failure_delay": 0.02, "auth_address_failures": 50, "error_sleep": 0.02},
    }


@pytest.fixture
def server(mail_server: ServerFactory, tmp_path: Path, tls: tuple[Path, Path]) -> MailServer:
    return mail_server(settings=settings(tmp_path, tls[1], pop3_login_delay=0),
                       services=("smtp", "submission", "pop3"))


def test_msmtp_submits_with_the_full_address(server: MailServer, tls: tuple[Path, Path],
                                            tmp_path: Path) -> None:
    msmtp = shutil.which("msmtp") or pytest.skip("msmtp not installed")
    rc = tmp_path / "msmtprc"
    rc.write_text(
        f"account default\nhost 127.0.0.1\nport {server.port('submission')}\n"
        f"tls on\ntls_starttls on\ntls_trust_file {tls[0]}\ntls_host_override localhost\n"
        "auth plain\nuser Alice@A.Example\npassword pw a\nfrom alice@a.example\n"
    )
    rc.chmod(0o600)
    result = subprocess.run(
        [msmtp, "-C", str(rc), "alice@b.example", "bob@b.example"],
        input="From: alice@a.example\nSubject: cross-domain\n\nhello b\n",
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (to_alice,) = server.wait_for_messages("alice@b.example", 1)
    server.wait_for_messages("bob@b.example", 1)
    assert b"(Authenticated sender: alice@a.example)" in to_alice.read_bytes()
    assert not server.maildir("alice@a.example").exists()  # another user
    server.wait_for_log(r"sasl_method=PLAIN, sasl_username=alice@a\.example$")


def test_mpop_and_fetchmail_with_the_full_address(server: MailServer, tls: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    server.send_test_message("alice@b.example", "for alice at b")
    server.send_test_message("alice@a.example", "for alice at a")
    server.send_test_message("bob@b.example", "for bob")
    server.wait_for_messages("bob@b.example", 1)
    server.wait_for_messages("alice@a.example", 1)
    server.wait_for_messages("alice@b.example", 1)
    if shutil.which("mpop"):
        out = maildir(tmp_path / "mpop")
        result = subprocess.run(
            ["mpop", "--host=127.0.0.1", f"--port={server.port('pop3')}", "--timeout=20",
             "--tls=on", "--tls-starttls=on", f"--tls-trust-file={tls[0]}",
             "--tls-host-override=localhost", "--auth=plain", "--user=ALICE@b.example",
             "--passwordeval=echo pw b", f"--delivery=maildir,{out}", "--keep=off",
             f"--uidls-file={tmp_path / 'uidls'}"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        (got,) = (out / "new").iterdir()
        assert b"Subject: for alice at b" in got.read_bytes()
        assert server.messages("alice@b.example") == []
        assert len(server.messages("alice@a.example")) == 1  # untouched: another user
    if shutil.which("fetchmail"):
        out = maildir(tmp_path / "fetchmail")
        mda = tmp_path / "mda.sh"
        mda.write_text(f"#!/bin/sh\nn=$(date +%s%N).$$\ncat > {out}/tmp/$n && "
                       f"mv {out}/tmp/$n {out}/new/$n\n")
        mda.chmod(0o755)
        rc = tmp_path / "fetchmailrc"
        rc.write_text(
            f"set no syslog\npoll localhost via 127.0.0.1 protocol pop3 port {server.port('pop3')}"
            f" timeout 20\n  user \"Bob@B.Example\" there with password \"pw bob\" is \"root\" here\n"
            f'  sslproto "TLS1.2+" sslcertck sslcommonname "localhost" sslcertfile "{tls[0]}"\n'
            f'  nokeep mda "{mda}"\n'
        )
        rc.chmod(0o600)
        result = subprocess.run(
            ["fetchmail", "-f", str(rc), "--nodetach", "--pidfile", str(tmp_path / "pid")],
            env={**os.environ, "HOME": str(tmp_path), "FETCHMAILHOME": str(tmp_path)},
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        (got,) = (out / "new").iterdir()
        assert b"Subject: for bob" in got.read_bytes()
        assert server.messages("bob@b.example") == []


def maildir(path: Path) -> Path:
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True)
    return path


def pop3_tls(server: MailServer, ca: Path) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=20)
    client.stls(ssl.create_default_context(cafile=str(ca)))
    return client


def test_pop3_auth_plain_and_hostile_names(server: MailServer, tls: tuple[Path, Path]) -> None:
    client = pop3_tls(server, tls[0])
    token = base64.b64encode(b"\0alice@A.EXAMPLE\0pw a").decode()
    assert client._shortcmd(f"AUTH PLAIN {token}").startswith(b"+OK")
    client.quit()
    for name in HOSTILE:
        client = pop3_tls(server, tls[0])
        client.user(name[:200])  # POP3 lines are bounded (RFC 2449); PASS decides
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            client.pass_(PASSWORDS["alice@a.example"])
        client.quit()
    # raw lines, one session: a NUL inside the name (AUTH PLAIN cannot carry one: it would be a
    # separator), a 300-character name sent whole, both followed by PASS; then a good login
    raw = socket.create_connection(("127.0.0.1", server.port("pop3")), timeout=20)
    lines = raw.makefile("rwb")
    assert lines.readline().startswith(b"+OK")

    def say(line: bytes) -> bytes:
        lines.write(line + b"\r\n")
        lines.flush()
        return lines.readline()

    password = PASSWORDS["alice@a.example"].encode()
    for name in (b"ali\0ce@a.example", b"alice@a.example\0"):
        assert say(b"USER " + name) == b"-ERR NUL character in command\r\n", name
        assert say(b"PASS " + password).startswith(b"-ERR"), name
    assert say(b"USER " + b"x" * 300 + b"@a.example") == b"-ERR Line too long\r\n"
    assert say(b"PASS " + password).startswith(b"-ERR")
    token = base64.b64encode(b"\0" + b"y" * 300 + b"@a.example\0" + password)
    assert say(b"AUTH PLAIN " + token).startswith(b"-ERR [AUTH]")
    assert say(b"USER alice@a.example") == b"+OK\r\n"  # the session goes on
    assert say(b"PASS " + password).startswith(b"+OK Logged in")
    assert say(b"QUIT") == b"+OK Logging out\r\n"
    raw.close()
    server.wait_for_log(r"login failed \(\w+ ?\w*\): user=<a/b@a\.example>")
    server.wait_for_log(r"logout: user=<alice@a\.example>, reason=QUIT")
    assert "Traceback" not in server.log_path.read_text()


def test_smtp_auth_hostile_names_get_535(server: MailServer, tls: tuple[Path, Path]) -> None:
    context = ssl.create_default_context(cafile=str(tls[0]))
    for name in [*HOSTILE, "alice\x01@a.example"]:
        with smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=20) as smtp:
            smtp.starttls(context=context)
            smtp.ehlo("client.test")
            token = base64.b64encode(f"\0{name}\0pw a".encode()).decode()
            code, _ = smtp.docmd("AUTH", f"PLAIN {token}")
            assert code == 535, name
    # AUTH LOGIN carries any byte in the name, NUL included; AUTH PLAIN with a NUL too many
    logins = [b"alice\0@a.example", b"\0alice@a.example", b"../alice@a.example",
              b"a/b@a.example", b"alice@a.example/..", b"x" * 300 + b"@a.example"]
    plains = [b"\0ali\0ce@a.example\0pw a", b"ali\0ce@a.example\0alice@a.example\0pw a"]
    for mechanism, first in [*(("LOGIN", n) for n in logins), *(("PLAIN", p) for p in plains)]:
        with smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=20) as smtp:
            smtp.starttls(context=context)
            smtp.ehlo("client.test")
            code, _ = smtp.docmd("AUTH", f"{mechanism} {base64.b64encode(first).decode()}")
            if code == 334:  # LOGIN asks for the password
                code, _ = smtp.docmd(base64.b64encode(b"pw a").decode())
            assert code in (535, 501), (mechanism, first[:20], code)
            assert smtp.noop()[0] == 250  # the session goes on
    with smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=20) as smtp:
        smtp.starttls(context=context)
        smtp.login("ALICE@a.example", "pw a")
    assert "Traceback" not in server.log_path.read_text()


def test_login_delay_and_expire_are_announced_and_kept(
    mail_server: ServerFactory, tmp_path: Path, tls: tuple[Path, Path]
) -> None:
    own = mail_server(settings=settings(tmp_path, tls[1], pop3_login_delay=900,
                                        pop3_expire="NEVER"), services=("pop3",))
    client = pop3_tls(own, tls[0])
    caps = client.capa()
    assert caps["LOGIN-DELAY"] == ["900"] and caps["EXPIRE"] == ["NEVER"]
    client.user("alice@a.example")
    client.pass_("pw a")
    client.quit()
    again = pop3_tls(own, tls[0])
    again.user("alice@a.example")
    with pytest.raises(poplib.error_proto, match=r"\[LOGIN-DELAY\]"):
        again.pass_("pw a")
    again.quit()
    other = pop3_tls(own, tls[0])  # another user is not delayed
    other.user("alice@b.example")
    other.pass_("pw b")
    other.quit()


def test_login_delay_holds_across_pop3_and_pop3s(
    mail_server: ServerFactory, tmp_path: Path, tls: tuple[Path, Path]
) -> None:
    """One user's logins are spaced over the whole daemon: a login on 110 then one on 995
    within the delay is refused, as two logins on one port are."""
    own = mail_server(settings=settings(tmp_path, tls[1], pop3_login_delay=900),
                      services=("pop3", "pop3s"))
    client = pop3_tls(own, tls[0])
    client.user("alice@a.example")
    client.pass_("pw a")
    client.quit()
    secure = poplib.POP3_SSL("127.0.0.1", own.port("pop3s"), timeout=20,
                             context=ssl.create_default_context(cafile=str(tls[0])))
    secure.user("Alice@A.Example")
    with pytest.raises(poplib.error_proto, match=r"\[LOGIN-DELAY\]"):
        secure.pass_("pw a")
    secure.user("bob@b.example")  # the session goes on; another user is not delayed
    secure.pass_("pw bob")
    secure.quit()
    own.wait_for_log(r"login refused \(LOGIN-DELAY 900s\): user=<alice@a\.example>")
    assert "Traceback" not in own.log_path.read_text()


def test_aliases_and_catch_all_are_per_domain(
    mail_server: ServerFactory, tmp_path: Path, tls: tuple[Path, Path]
) -> None:
    """sales@a.example and sales@b.example are two aliases with two targets; b.example's
    catch-all takes its unknown local parts only, after its users: a.example's unknown ones
    still get 550 5.1.1."""
    config = settings(tmp_path, tls[1])
    config["aliases"] = {"sales@a.example": ["alice@a.example"],
                         "sales@b.example": ["bob@b.example"], "@b.example": ["alice@b.example"]}
    own = mail_server(settings=config, services=("smtp",))
    for to, subject in [("sales@a.example", "sales a"), ("SALES@B.example", "sales b"),
                        ("nobody@b.example", "stray b"), ("bob@b.example", "bob himself")]:
        own.send_test_message(to, subject)
    subjects = {user: sorted(subject_of(p) for p in own.messages(user))
                for user in PASSWORDS}
    assert subjects == {"alice@a.example": ["sales a"], "alice@b.example": ["stray b"],
                        "bob@b.example": ["bob himself", "sales b"]}
    with smtplib.SMTP(own.host, own.smtp_port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("s@client.test")
        code, text = smtp.rcpt("nobody@a.example")  # b.example's catch-all is not a.example's
        assert (code, text[:5]) == (550, b"5.1.1"), text
    assert "Traceback" not in own.log_path.read_text()


def test_quota_default_per_domain(
    mail_server: ServerFactory, tmp_path: Path, tls: tuple[Path, Path]
) -> None:
    """`[quota] domains` beats `default` for its domain only: alice@a.example (a.example's 1k)
    with 2k stored is full, 452 4.2.2 at RCPT; alice@b.example with the same 2k is under the
    10M default and gets her mail."""
    config = settings(tmp_path, tls[1])
    config["quota"] = {"default": "10M", "domains": {"a.example": "1k"}}
    own = mail_server(settings=config, services=("smtp",))
    for user, limit in (("alice@a.example", 1024), ("alice@b.example", 10 * 1024 * 1024)):
        box = own.maildir(user)
        for sub in ("tmp", "new", "cur"):
            (box / sub).mkdir(parents=True)
        (box / "cur" / "1700000000.M1P1Q1.old,S=2048:2,S").write_bytes(b"x" * 2048)
        # as a delivery or Dovecot's quota plugin leaves it (RCPT only trusts this file)
        (box / "maildirsize").write_bytes(f"{limit}S\n2048 1\n".encode())
    with smtplib.SMTP(own.host, own.smtp_port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("s@client.test")
        code, text = smtp.rcpt("alice@a.example")
        assert (code, text[:5]) == (452, b"4.2.2"), text
        assert smtp.rcpt("Alice@B.Example")[0] == 250
        smtp.data(b"Subject: room at b\r\n\r\nhi\r\n")
    got = own.wait_for_messages("alice@b.example", 2)
    assert "room at b" in [subject_of(p) for p in got]
    assert len(own.messages("alice@a.example")) == 1


def subject_of(path: Path) -> str:
    for line in path.read_bytes().splitlines():
        if line.startswith(b"Subject: "):
            return line[9:].decode()
    return ""


def test_removed_domain_mail_is_held_then_delivered(server: MailServer) -> None:
    """b.example leaves local_domains while a message for bob@b.example is queued (its Maildir
    cannot be written: the delivery is deferred). After the reload the message is held, logged,
    neither relayed nor bounced; when b.example is back it is delivered, once."""
    server.send_test_message("bob@b.example", "first")
    server.wait_for_messages("bob@b.example", 1)
    box = server.maildir("bob@b.example")
    shutil.rmtree(box)
    box.write_text("not a directory")  # deliveries fail temporarily
    server.send_test_message("bob@b.example", "queued")
    server.wait_for_log(r"to=<bob@b\.example>, relay=local, .*status=deferred")
    server.update_config({"local_domains": ["a.example"]})
    server.reload()
    server.wait_for_log(r"domain b\.example is not a local domain any more")
    with smtplib.SMTP(server.host, server.smtp_port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        code, _ = smtp.docmd("MAIL", "FROM:<s@client.test>")
        assert code == 250
        code, _ = smtp.docmd("RCPT", "TO:<bob@b.example>")
        assert code == 554  # not ours any more, and no relay for strangers
    flush = subprocess.run(  # the deferred message is due again now: routed, and held
        [sys.executable, "-m", "mailhaven", "queue", "flush", "-c", str(server.config_path)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert flush.returncode == 0, flush.stderr
    server.wait_for_log(r"to=<bob@b\.example>, relay=none, status=held")
    assert "bounced" not in server.log_path.read_text()
    box.unlink()
    server.update_config({"local_domains": DOMAINS})
    server.reload()
    server.wait_for_log(r"domain b\.example is local: 1 held message\(s\) released")
    (got,) = server.wait_for_messages("bob@b.example", 1)
    assert b"Subject: queued" in got.read_bytes()



def test_upgrade_from_the_old_layout(mail_server: ServerFactory, tmp_path: Path) -> None:
    """A state directory from before virtual domains (bare names, `mail/<user>/`): the first
    start moves the Maildirs and qualifies the users; old and new logins reach the mail."""
    own = mail_server(start=False, services=("pop3",),
                      settings={"users_file": str(tmp_path / "old.passwd")})
    (tmp_path / "old.passwd").write_text(f"carol:{{ARGON2ID}}{FAST.hash('pw c')}:::::\n")
    old = own.state_dir / "mail" / "carol"
    for sub in ("tmp", "new", "cur"):
        (old / sub).mkdir(parents=True)
    (old / "new" / "1700000000.M1P1Q1.old,S=12").write_bytes(b"Subject: x\n\n")
    (old / "cur" / "1700000001.M1P1Q1.old,S=12:2,S").write_bytes(b"Subject: y\n\n")
    own.start()
    own.wait_for_log(r"mailbox .*/mail/carol moved to .*/mail/localhost/carol")
    assert (tmp_path / "old.passwd").read_text().startswith("carol@localhost:")
    assert len(own.messages("carol@localhost")) == 2 and not old.exists()
    for login in ("carol", "CAROL@localhost"):  # one local domain: the bare name still works
        client = poplib.POP3("127.0.0.1", own.port("pop3"), timeout=20)
        client.user(login)
        client.pass_("pw c")
        assert client.stat()[0] == 2
        assert [u.split()[1] for u in client.uidl()[1]] == [
            b"1700000000.M1P1Q1.old,S=12", b"1700000001.M1P1Q1.old,S=12"]  # UIDLs unchanged
        client.quit()
