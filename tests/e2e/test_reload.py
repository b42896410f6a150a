"""End to end: SIGHUP applies every reloadable setting, all or nothing, and a malformed users
file is refused (with its line number) at `config check`, at start-up, on SIGHUP and when it
changes under a running server, which keeps serving the last good one.

Each reload test starts a real `mailhaven serve`, observes the old behaviour over a socket,
rewrites the configuration, sends a real SIGHUP and observes the new behaviour.
"""

from __future__ import annotations

import os
import poplib
import re
import signal
import smtplib
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from argon2 import PasswordHasher
from tests.e2e.conftest import ServerFactory
from tests.e2e.send_support import Sink, send
from tests.support.server import MailServer, RawClient, ServerError, free_port

from mailhaven.mailbox.users import UserDB

pytestmark = pytest.mark.e2e

FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
APPLIED = r"reload: configuration .* applied"
REFUSED = r"reload: refused, keeping the old configuration \(nothing applied\): "
#: a users file line that is not UTF-8 (Latin-1 "été")
BAD_LINE = b"bob:\xe9t\xe9:::::\n"


def reload_with(server: MailServer, settings: dict[str, Any]) -> None:
    """Merge `settings` into the config file, SIGHUP, and wait until the reload is applied."""
    before = len(re.findall(APPLIED, server.log()))
    server.update_config(settings)
    server.reload()
    server.wait_for_log(APPLIED, count=before + 1)


def size_offered(server: MailServer) -> int:
    with smtplib.SMTP(server.host, server.smtp_port, "client.test", 10) as s:
        s.ehlo()
        return int(s.esmtp_features["size"])


def rcpt(server: MailServer, address: str) -> int:
    with smtplib.SMTP(server.host, server.smtp_port, "client.test", 10) as s:
        s.ehlo()
        s.mail("sender@example.org")
        return s.rcpt(address)[0]


def etrn(server: MailServer, node: str) -> int:
    with RawClient(server.host, server.smtp_port) as client:
        client.reply()
        client.command("EHLO client.test")
        return client.command(f"ETRN {node}")[0]


def greeting_code(server: MailServer) -> int:
    with RawClient(server.host, server.smtp_port) as client:
        return client.reply()[0]


def write_users(path: Path) -> Path:
    UserDB(path, hasher=FAST_HASHER).add("alice", "secret")
    return path


# ---------------------------------------------------------------------- every reloadable setting


def test_a_newly_held_domain_can_be_released_by_etrn(mail_server: ServerFactory) -> None:
    server = mail_server(settings={"etrn": {"held_domains": ["old.test"]}})
    assert etrn(server, "new.test") == 459
    reload_with(server, {"etrn": {"held_domains": ["old.test", "new.test"]}})
    send(server, ["someone@new.test"], mark="held")
    assert etrn(server, "new.test") == 253  # 1 pending message started
    server.wait_for_log(r"ETRN new.test from \[127.0.0.1\]: 1 message\(s\) released")


def test_etrn_clients(mail_server: ServerFactory) -> None:
    server = mail_server(
        settings={"etrn": {"held_domains": ["part.test"], "clients": ["192.0.2.0/24"]}}
    )
    assert etrn(server, "part.test") == 459
    reload_with(server, {"etrn": {"clients": ["127.0.0.0/8"]}})
    assert etrn(server, "part.test") == 251  # allowed now; nothing waiting


def test_etrn_release_interval(mail_server: ServerFactory) -> None:
    server = mail_server(settings={"etrn": {"held_domains": ["part.test"]}})
    send(server, ["someone@part.test"], mark="held")
    reload_with(server, {"etrn": {"release_interval": 0.5}})
    server.wait_for_log(r"scheduled release of part-time domains: 1 message\(s\)")


def test_a_new_hostname_waits_for_a_restart(mail_server: ServerFactory) -> None:
    """The host name is in Received: fields, bounces and Maildir names: all or nothing, so a
    reload keeps it (and says so) rather than change the greeting alone."""
    server = mail_server(settings={"hostname": "mx.test"})
    reload_with(server, {"hostname": "renamed.test", "local_users": ["postmaster", "newbie"]})
    server.wait_for_log(r"reload: hostname changed; it takes effect at the next restart")
    with RawClient(server.host, server.smtp_port) as client:
        assert client.reply() == (220, ["mx.test ESMTP mailhaven"])
    assert rcpt(server, "newbie@localhost") == 250


def test_a_sighup_as_soon_as_the_port_listens_is_applied(mail_server: ServerFactory) -> None:
    """With worker processes the daemon listens before its start is over (the workers are
    still spawning): a SIGHUP then is applied once it has started, and nothing dies."""
    for attempt in range(3):
        server = mail_server(settings={"smtp_processes": 2})  # returns once the port listens
        reload_with(server, {"local_users": ["postmaster", f"early{attempt}"]})
        assert server.proc is not None and server.proc.poll() is None
        assert rcpt(server, f"early{attempt}@localhost") == 250
        server.stop()


def test_connection_rate(mail_server: ServerFactory) -> None:
    server = mail_server()
    assert [greeting_code(server) for _ in range(3)] == [220, 220, 220]
    reload_with(server, {"limits": {"connection_rate": 2}})
    assert [greeting_code(server) for _ in range(3)] == [220, 220, 421]


def test_message_rate(mail_server: ServerFactory) -> None:
    server = mail_server()
    reload_with(server, {"limits": {"message_rate": 1}})
    with smtplib.SMTP(server.host, server.smtp_port, "client.test", 10) as s:
        s.ehlo()
        assert s.mail("a@example.org")[0] == 250
        s.rset()
        assert s.mail("a@example.org")[0] == 450


def test_message_size(mail_server: ServerFactory) -> None:
    server = mail_server(settings={"limits": {"message_size": 100_000}})
    assert size_offered(server) == 100_000
    reload_with(server, {"limits": {"message_size": 200_000}})
    assert size_offered(server) == 200_000


def test_command_timeout(mail_server: ServerFactory) -> None:
    server = mail_server()
    reload_with(server, {"timeouts": {"command": 1.0}})
    with RawClient(server.host, server.smtp_port, timeout=15) as client:
        client.reply()
        assert client.reply()[0] == 421  # timed out after about a second of silence


def test_local_users(mail_server: ServerFactory) -> None:
    server = mail_server()
    assert rcpt(server, "newbie@localhost") == 550
    reload_with(server, {"local_users": ["postmaster", "newbie"]})
    assert rcpt(server, "newbie@localhost") == 250


def test_local_domains(mail_server: ServerFactory) -> None:
    server = mail_server(settings={"trusted_networks": []})
    assert rcpt(server, "postmaster@other.test") == 554
    reload_with(server, {"local_domains": ["localhost", "other.test"]})
    assert rcpt(server, "postmaster@other.test") == 250


def test_trusted_networks_and_relay_domains(mail_server: ServerFactory) -> None:
    server = mail_server(settings={"trusted_networks": []})
    assert rcpt(server, "x@backup.test") == 554
    reload_with(server, {"relay_domains": ["backup.test"]})
    assert rcpt(server, "x@backup.test") == 250
    assert rcpt(server, "x@elsewhere.test") == 554
    reload_with(server, {"trusted_networks": ["127.0.0.0/8"]})
    assert rcpt(server, "x@elsewhere.test") == 250


def test_aliases(mail_server: ServerFactory) -> None:
    server = mail_server()
    assert rcpt(server, "team@localhost") == 550
    reload_with(server, {"aliases": {"team": ["postmaster"]}})
    assert rcpt(server, "team@localhost") == 250


@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink("127.0.0.1", free_port()) as running:
        yield running


def test_relay_port(mail_server: ServerFactory, sink: Sink) -> None:
    """The relay agent takes the new `[relay]` settings: held mail reaches the new port."""
    server = mail_server(
        settings={
            "queue": {"minimal_backoff": 1, "maximal_backoff": 1},
            "relay": {
                "port": free_port(),  # nothing listens: deferred
                "tls": "none",
                "transport": {"remote.test": "[127.0.0.1]"},
            },
        }
    )
    send(server, ["bob@remote.test"], mark="relayed")
    server.wait_for_log(r"to=<bob@remote.test>.*status=deferred")
    reload_with(server, {"relay": {"port": sink.port}})
    [received] = sink.wait_for(1, timeout=15)
    assert received.rcpt_tos == ["bob@remote.test"]


def test_queue_lifetime(mail_server: ServerFactory) -> None:
    """The scheduler takes the new `[queue]` policy: mail older than the new lifetime is
    returned at its next attempt instead of deferred again."""
    server = mail_server(
        settings={
            "queue": {"minimal_backoff": 1, "maximal_backoff": 1, "lifetime": 3600},
            "relay": {"port": free_port(), "transport": {"remote.test": "[127.0.0.1]"}},
        }
    )
    send(server, ["bob@remote.test"], mark="expiring", sender="postmaster@localhost")
    server.wait_for_log(r"to=<bob@remote.test>.*status=deferred")
    reload_with(server, {"queue": {"lifetime": 1}})
    server.wait_for_log(r"from=<postmaster@localhost>, status=expired, returned to sender")
    server.wait_for_messages("postmaster", 1)  # the sender's non-delivery report


def test_log_level(mail_server: ServerFactory) -> None:
    server = mail_server()
    greeting_code(server)
    server.wait_for_log(r"connect from")
    reload_with(server, {"log_level": "warning"})
    greeting_code(server)
    server.write_config("hostname = \n")  # a refusal is an error line: the log is up to date
    server.reload()
    server.wait_for_log(REFUSED + ".*TOML syntax error")
    after = server.log().split("reload: configuration", 1)[1]
    assert "connect from" not in after


def issue(directory: Path, name: str) -> tuple[Path, Path, str]:
    """A fresh CA's certificate for 127.0.0.1 (cert file, key file, its common name)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert = trustme.CA().issue_cert("mx.test", "127.0.0.1", common_name=name)
    cert.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    cert.private_key_pem.write_to_path(str(directory / "key.pem"))
    return directory / "cert.pem", directory / "key.pem", name


def common_name_over_starttls(server: MailServer) -> str:
    with smtplib.SMTP(server.host, server.smtp_port, "client.test", 10) as s:
        s.starttls(context=ssl._create_unverified_context())
        der = s.sock.getpeercert(binary_form=True)
    assert der is not None
    return subject_cn(ssl.DER_cert_to_PEM_cert(der).encode())


def subject_cn(pem: bytes) -> str:
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-subject", "-nameopt", "multiline"],
        input=pem, capture_output=True, check=True, timeout=10,
    ).stdout.decode()
    return re.search(r"commonName\s*=\s*(\S+)", out).group(1)  # type: ignore[union-attr]


def common_name_over_s_client(port: int) -> str:
    """What `openssl s_client -starttls smtp` is shown (no SNI: a client dialling an IP)."""
    out = subprocess.run(
        ["openssl", "s_client", "-starttls", "smtp", "-noservername",
         "-connect", f"127.0.0.1:{port}"],
        input=b"", capture_output=True, timeout=15,
    ).stdout
    pem = re.search(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", out, re.S)
    assert pem is not None, out[-500:]
    return subject_cn(pem.group(0))


def test_a_renewed_certificate_under_new_file_names(
    mail_server: ServerFactory, tmp_path: Path
) -> None:
    """Renewal that writes new files (versioned names) and points the config at them."""
    cert, key, _ = issue(tmp_path / "v1", "first.test")
    server = mail_server(settings={"tls": {"cert": str(cert), "key": str(key)}})
    assert common_name_over_starttls(server) == "first.test"
    cert, key, _ = issue(tmp_path / "v2", "second.test")
    reload_with(server, {"tls": {"cert": str(cert), "key": str(key)}})
    assert common_name_over_starttls(server) == "second.test"
    assert common_name_over_s_client(server.smtp_port) == "second.test"


def test_a_certificate_replaced_in_place(mail_server: ServerFactory, tmp_path: Path) -> None:
    """certbot-style renewal: the same file names, new contents (cert and key files apart)."""
    cert, key, _ = issue(tmp_path / "live", "first.test")
    server = mail_server(settings={"tls": {"cert": str(cert), "key": str(key)}})
    assert common_name_over_s_client(server.smtp_port) == "first.test"
    issue(tmp_path / "live", "second.test")
    server.reload()
    server.wait_for_log(APPLIED)
    assert common_name_over_s_client(server.smtp_port) == "second.test"
    assert common_name_over_starttls(server) == "second.test"


def test_a_configured_certificate_replaces_the_self_signed_one_on_reload(
    mail_server: ServerFactory, tmp_path: Path
) -> None:
    """An MX-only server without a certificate serves its self-signed one; a reload that
    names a certificate makes the MX serve that one (no restart)."""
    server = mail_server()
    assert common_name_over_starttls(server) == "mx.test"  # the self-signed placeholder
    cert, key, _ = issue(tmp_path / "new", "first.test")
    reload_with(server, {"tls": {"cert": str(cert), "key": str(key)}})
    assert common_name_over_starttls(server) == "first.test"


def accepted_recipients(server: MailServer) -> int:
    with smtplib.SMTP(server.host, server.smtp_port, "client.test", 10) as s:
        s.ehlo()
        s.mail("sender@example.org")
        return sum(s.rcpt("postmaster@localhost")[0] == 250 for _ in range(101))


def second_connection(server: MailServer) -> int:
    with RawClient(server.host, server.smtp_port) as first:
        first.reply()
        return greeting_code(server)


def codes(server: MailServer, *commands: str) -> list[int]:
    """Reply codes to `commands` after EHLO, until the server hangs up."""
    out = []
    with RawClient(server.host, server.smtp_port) as client:
        client.reply()
        client.command("EHLO client.test")
        for command in commands:
            try:
                out.append(client.command(command)[0])
            except (ConnectionError, EOFError):
                break
    return out


def early_talker(server: MailServer) -> int:
    with RawClient(server.host, server.smtp_port) as client:
        client.send("EHLO client.test\r\n")
        return client.reply()[0]


#: [limits] key -> (new value, probe, what it shows before the reload, and after)
LIMITS: dict[str, tuple[float, Callable[[MailServer], object], object, object]] = {
    "recipients": (100, accepted_recipients, 101, 100),
    "connections": (1, second_connection, 220, 421),
    "connections_per_ip": (1, second_connection, 220, 421),
    "hard_error_limit": (
        2, lambda s: codes(s, "FOO", "FOO", "FOO"), [500, 500, 500], [500, 500, 421]
    ),
    "commands_per_session": (
        3, lambda s: codes(s, "NOOP", "NOOP", "NOOP"), [250] * 3, [250, 250, 421]
    ),
    "command_line": (2000, lambda s: codes(s, "NOOP " + "x" * 1000), [500], [250]),
    "greet_pause": (1.0, early_talker, 220, 554),
}


@pytest.mark.parametrize("key", sorted(LIMITS))
def test_limits(mail_server: ServerFactory, key: str) -> None:
    value, probe, before, after = LIMITS[key]
    server = mail_server(settings={"limits": {"error_sleep": 0.0}})
    assert probe(server) == before
    reload_with(server, {"limits": {key: value}})
    assert probe(server) == after


def test_catch_all_and_recipient_delimiter(mail_server: ServerFactory) -> None:
    server = mail_server()
    assert rcpt(server, "postmaster+tag@localhost") == 550
    assert rcpt(server, "nobody@localhost") == 550
    reload_with(server, {"recipient_delimiter": "+"})
    assert rcpt(server, "postmaster+tag@localhost") == 250
    reload_with(server, {"catch_all": "postmaster"})
    assert rcpt(server, "nobody@localhost") == 250


# ---------------------------------------------------------------------- all or nothing


def test_a_bad_users_file_refuses_the_whole_reload(
    mail_server: ServerFactory, tmp_path: Path
) -> None:
    users = write_users(tmp_path / "users.passwd")
    server = mail_server(
        settings={"users_file": str(users), "limits": {"message_size": 100_000}}
    )
    assert rcpt(server, "newbie@localhost") == 550
    users.write_bytes(users.read_bytes() + BAD_LINE)
    server.update_config(
        {"local_users": ["postmaster", "newbie"], "limits": {"message_size": 200_000}}
    )
    server.reload()
    server.wait_for_log(REFUSED + r".*users\.passwd: line 2: not valid UTF-8")
    assert rcpt(server, "newbie@localhost") == 550
    assert size_offered(server) == 100_000
    assert rcpt(server, "alice@localhost") == 250  # the last good users file
    assert not re.search(APPLIED, server.log())
    assert "Traceback" not in server.log()


def test_a_broken_certificate_refuses_the_whole_reload(
    mail_server: ServerFactory, tmp_path: Path
) -> None:
    cert, key, _ = issue(tmp_path / "live", "first.test")
    server = mail_server(settings={"tls": {"cert": str(cert), "key": str(key)}})
    cert.write_text("not a certificate\n")
    reload_before = size_offered(server)
    server.update_config({"limits": {"message_size": reload_before + 1000}})
    server.reload()
    server.wait_for_log(REFUSED + r"TLS certificate .*cert\.pem")
    assert size_offered(server) == reload_before
    assert common_name_over_starttls(server) == "first.test"


# ---------------------------------------------------------------------- a malformed users file


def test_a_users_file_broken_while_running_keeps_the_last_good_one(
    mail_server: ServerFactory, tmp_path: Path
) -> None:
    """RCPT, AUTH and POP3 keep working with the last good file (they used to answer 451, no
    reply at all, and -ERR [SYS/TEMP]); the log names the line."""
    users = write_users(tmp_path / "users.passwd")
    server = mail_server(
        settings={"users_file": str(users)}, services=("smtp", "submission", "pop3")
    )
    users.write_bytes(users.read_bytes() + BAD_LINE)
    assert rcpt(server, "alice@localhost") == 250
    with smtplib.SMTP(server.host, server.port("submission"), "client.test", 10) as s:
        s.starttls(context=ssl._create_unverified_context())
        assert s.login("alice", "secret")[0] == 235
    pop = poplib.POP3(server.host, server.port("pop3"), timeout=10)
    try:
        pop.user("alice")
        assert pop.pass_("secret").startswith(b"+OK")
    finally:
        pop.quit()
    server.wait_for_log(r"users file refused, keeping the last good one: .*line 2: not valid")
    assert "Traceback" not in server.log()


def test_a_malformed_users_file_stops_start_up_and_config_check(
    mail_server: ServerFactory, tmp_path: Path
) -> None:
    users = tmp_path / "users.passwd"
    users.write_bytes(b"# users\nalice:{ARGON2ID}x:::::\n" + BAD_LINE)
    server = mail_server(settings={"users_file": str(users)}, start=False)
    check = subprocess.run(
        [sys.executable, "-m", "mailhaven", "config", "check", "-c", str(server.config_path)],
        capture_output=True, text=True, timeout=30,
    )
    assert check.returncode == 2
    assert f"{users}: line 3: not valid UTF-8" in check.stderr
    with pytest.raises(ServerError, match="exited with 2"):
        server.start()
    assert f"cannot start: {users}: line 3: not valid UTF-8" in server.log()
    assert "Traceback" not in server.log()
    users.write_bytes(b"# users\nalice:{ARGON2ID}x:::::\nnot a user line\n")
    check = subprocess.run(
        [sys.executable, "-m", "mailhaven", "config", "check", "-c", str(server.config_path)],
        capture_output=True, text=True, timeout=30,
    )
    assert check.returncode == 2 and "line 3: expected user:password" in check.stderr


def test_reload_reaches_the_worker_processes(mail_server: ServerFactory) -> None:
    """`smtp_processes` > 1: the daemon forwards SIGHUP and each worker applies it too (the
    daemon is frozen, so only the worker can answer); an ETRN for a domain held since the
    reload releases the worker's shard as well."""
    server = mail_server(
        settings={"smtp_processes": 2, "etrn": {"held_domains": ["old.test"]}}
    )
    [match] = server.wait_for_log(r"worker 1 started \(pid (\d+)\)")
    worker = int(match.group(1))
    server.wait_for_log(r"worker 1 ready on 1 smtp socket")
    server.update_config(
        {"etrn": {"held_domains": ["old.test", "new.test"]}, "limits": {"message_rate": 1}}
    )
    server.reload()
    server.wait_for_log(rf"\[{worker}\]: .*{APPLIED}")
    server.wait_for_log(rf"\[{server.pid}\]: .*{APPLIED}")
    os.kill(server.pid, signal.SIGSTOP)
    try:
        send(server, ["someone@new.test"], mark="held in the worker")
        with smtplib.SMTP(server.host, server.smtp_port, "client.test", 10) as s:
            s.ehlo()
            assert s.mail("a@example.org")[0] == 450  # the worker's new message rate
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert etrn(server, "new.test") == 253
    server.wait_for_log(r"ETRN new.test from \[127.0.0.1\]: 1 message\(s\) released")
