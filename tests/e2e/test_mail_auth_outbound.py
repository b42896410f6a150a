"""End to end: outbound mail authentication between real `mailhaven serve` processes.

Three hosts on loopback, one common port, DNS only from `tests.support.dns_server`:
* **A** `mx.example.org` (127.0.0.2): our sending host. Users submit over STARTTLS + AUTH; it
  holds DKIM keys for example.org (RSA-2048 and Ed25519) and is example.org's MX.
* **B** `mx.dest.test` (127.0.0.3): another mailhaven, the destination MX for dest.test, with
  an alias `fwd@dest.test` -> `carol@remote.test` and an RSA key of its own (ARC sealing).
  `trusted_networks` is empty on both, so what A relays to B is inbound mail there.
* **remote.test** (127.0.0.4): a recording aiosmtpd sink, the "external" forward target.

Shown: submission (smtplib, AUTH PLAIN after STARTTLS) -> signed twice -> relayed -> stored in
B's Maildir, where both signatures verify in dkimpy and the RSA and the Ed25519 one each in
OpenDKIM (its resolver forwarding to the loopback DNS server); listing a new selector in
`[dkim] selectors` and reloading makes the next message carry only the new signature (key
rotation); the forward through B reaches
the sink with an SRS0 envelope sender of dest.test and an ARC set that dkimpy's arc_verify
passes (A's signature still verifies too); a bounce sent to that SRS address is reversed by B
and reaches alice's mailbox on A.
"""

from __future__ import annotations

import email.utils
import re
import smtplib
import ssl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
import trustme
from argon2 import PasswordHasher
from tests.e2e.conftest import ServerFactory
from tests.e2e.send_support import Sink, free_port_on, relay_settings
from tests.support.dkim_peers import dkimpy_dns, opendkim_verify
from tests.support.dns_server import DNSServer
from tests.support.server import MailServer

from mailhaven.mailbox.users import UserDB
from mailhaven.signing import keys as keystore

pytestmark = pytest.mark.e2e

A_IP, B_IP, SINK_IP = "127.0.0.2", "127.0.0.3", "127.0.0.4"
PASSWORD = "s3cret"


class Hosts:
    def __init__(self, a: MailServer, b: MailServer, sink: Sink, dns: DNSServer,
                 ca: Path) -> None:
        self.a, self.b, self.sink, self.dns, self.ca = a, b, sink, dns, ca


def keys_for(state: Path, domain: str, *algorithms: str) -> list[keystore.SigningKey]:
    return [keystore.generate(state / "dkim", domain, f"{alg.removesuffix('25519')}-e2e", alg)  # type: ignore[arg-type]
            for alg in algorithms]


@pytest.fixture(scope="module")
def hosts(module_mail_server: ServerFactory,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    work = tmp_path_factory.mktemp("outbound")
    port = free_port_on([A_IP, B_IP, SINK_IP])
    ca = trustme.CA()
    cert = ca.issue_cert("mx.example.org", A_IP)
    chain = work / "chain.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    ca.cert_pem.write_to_path(str(work / "ca.pem"))
    users = work / "users.passwd"
    UserDB(users, hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)).add(
        "alice", PASSWORD)
    a_state, b_state = work / "a-state", work / "b-state"
    a_keys = keys_for(a_state, "example.org", "rsa", "ed25519")
    # the next key of a rotation: published from the start, signing once it is listed
    a_keys.append(keystore.generate(a_state / "dkim", "example.org", "rsa-next", "rsa"))
    b_keys = keys_for(b_state, "dest.test", "rsa")
    records: dict[str, dict[str, list[object]]] = {
        "example.org": {"MX": [(10, "mx.example.org")]},
        "mx.example.org": {"A": [A_IP]},
        "dest.test": {"MX": [(10, "mx.dest.test")]},
        "mx.dest.test": {"A": [B_IP]},
        "remote.test": {"MX": [(10, "mx.remote.test")]},
        "mx.remote.test": {"A": [SINK_IP]},
    }
    for key in a_keys + b_keys:
        records[key.record_name] = {"TXT": [key.txt_value()]}
    with DNSServer(records) as dns, Sink(SINK_IP, port) as sink:
        common = {"trusted_networks": [], "limits": {"error_sleep": 0.05}}
        a = module_mail_server(
            host=A_IP, hostname="mx.example.org", ports={"smtp": port},
            services=("smtp", "submission"),
            settings=relay_settings(
                dns=dns.address, port=port, local_users=["postmaster"],
                local_domains=["example.org"], users_file=str(users), state_dir=str(a_state),
                tls={"cert": str(chain), "key": str(chain)},
                dkim={"helper": True,  # A signs through the helper process
                      "selectors": {"example.org": ["rsa-e2e", "ed-e2e"]}},
                **common),
        )
        b = module_mail_server(
            host=B_IP, hostname="mx.dest.test", ports={"smtp": port},
            settings=relay_settings(
                dns=dns.address, port=port, local_users=["postmaster", "bob"],
                local_domains=["dest.test"], state_dir=str(b_state),
                aliases={"fwd": ["carol@remote.test"]}, **common),
        )
        yield Hosts(a, b, sink, dns, work / "ca.pem")


def submit(hosts: Hosts, to: str, mark: str) -> None:
    """alice submits over STARTTLS + AUTH PLAIN; every recipient must be accepted."""
    context = ssl.create_default_context(cafile=str(hosts.ca))
    message = (
        f"From: Alice <alice@example.org>\r\nTo: <{to}>\r\nSubject: outbound {mark}\r\n"
        f"\r\nHello,  this is {mark}.\r\n\r\n"
    ).encode()
    with smtplib.SMTP(A_IP, hosts.a.port("submission"), timeout=20) as s:
        s.starttls(context=context)
        s.login("alice", PASSWORD)
        assert s.sendmail("alice@example.org", [to], message) == {}


def wait_file(folder: Path, mark: str, timeout: float = 20.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in folder.glob("*") if folder.is_dir() else ():
            data = path.read_bytes()
            if mark.encode() in data:
                return data
        time.sleep(0.05)
    raise AssertionError(f"{mark} not in {folder}")


def without(message: bytes, algorithm: bytes) -> bytes:
    """The message with the DKIM-Signature fields of `algorithm` removed (not signed by the
    other one), so OpenDKIM, which reports the first signature, sees the other alone."""
    message = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    header, _, body = message.partition(b"\r\n\r\n")
    fields = re.split(rb"\r\n(?![ \t])", header)
    kept = [f for f in fields if not (f.startswith(b"DKIM-Signature:") and algorithm in f)]
    return b"\r\n".join(kept) + b"\r\n\r\n" + body


def test_submitted_mail_is_signed_and_verifies_at_the_destination(
    hosts: Hosts, tmp_path: Path
) -> None:
    mark = uuid.uuid4().hex
    submit(hosts, "bob@dest.test", mark)
    stored = wait_file(hosts.b.maildir("bob") / "new", mark)
    assert stored.count(b"DKIM-Signature:") == 2
    for index in (0, 1):
        assert dkim.DKIM(stored).verify(idx=index, dnsfunc=dkimpy_dns(hosts.dns)), index
    for drop, expected in ((b"a=ed25519-sha256", "s=rsa-e2e"), (b"a=rsa-sha256", "s=ed-e2e")):
        verdict = opendkim_verify(without(stored, drop), hosts.dns, tmp_path / drop.decode())
        assert "d=example.org" in verdict and "succeeded" in verdict, verdict
        assert expected in verdict
    hosts.a.wait_for_log(r"DKIM-Signature field added \(s=rsa-e2e, d=example.org\)")


def test_rotation_by_selector_on_reload(hosts: Hosts) -> None:
    """Listing the new selector and reloading (SIGHUP) switches signing to it; the next
    message carries only the new signature, and it verifies."""
    old = hosts.a.config["dkim"]["selectors"]
    applied = r"reload: configuration .* applied"
    done = len([line for line in hosts.a.log_lines() if re.search(applied, line)])
    hosts.a.update_config({"dkim": {"selectors": {"example.org": ["rsa-next"]}}})
    hosts.a.reload()
    hosts.a.wait_for_log(applied, count=done + 1)
    try:
        mark = uuid.uuid4().hex
        submit(hosts, "bob@dest.test", mark)
        stored = wait_file(hosts.b.maildir("bob") / "new", mark)
        assert stored.count(b"DKIM-Signature:") == 1 and b"s=rsa-next;" in stored
        assert dkim.verify(stored.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"),
                           dnsfunc=dkimpy_dns(hosts.dns))
    finally:
        hosts.a.update_config({"dkim": {"selectors": old}})
        hosts.a.reload()
        hosts.a.wait_for_log(applied, count=done + 2)


def test_forward_gets_srs_and_arc_and_its_bounce_comes_home(hosts: Hosts) -> None:
    mark = uuid.uuid4().hex
    submit(hosts, "fwd@dest.test", mark)
    deadline = time.monotonic() + 20
    while not any(mark.encode() in r.content for r in hosts.sink.received):
        assert time.monotonic() < deadline, "the forward did not reach remote.test"
        time.sleep(0.05)
    [forwarded] = [r for r in hosts.sink.received if mark.encode() in r.content]
    assert forwarded.rcpt_tos == ["carol@remote.test"]
    srs = forwarded.mail_from
    assert re.fullmatch(r"SRS0=[\w+/]{4}=[A-Z2-7]{2}=example\.org=alice@dest\.test", srs), srs
    content = forwarded.content.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    result, sets, reason = dkim.arc_verify(content, dnsfunc=dkimpy_dns(hosts.dns))
    assert result == b"pass", (reason, sets)
    assert sets[0]["as-domain"] == b"dest.test" and sets[0]["cv"] == b"none"
    assert dkim.verify(content, dnsfunc=dkimpy_dns(hosts.dns))  # A's signature survived

    # remote.test bounces to the SRS address: B reverses it and A delivers to alice
    bounce = (
        f"From: MAILER-DAEMON@remote.test\r\nTo: <{srs}>\r\nSubject: Undelivered: {mark}\r\n"
        f"Date: {email.utils.formatdate()}\r\n\r\ncarol is gone ({mark})\r\n"
    ).encode()
    with smtplib.SMTP(B_IP, hosts.b.smtp_port, timeout=20) as s:
        s.ehlo("mx.remote.test")
        s.sendmail("", [srs], bounce)
    home = wait_file(hosts.a.maildir("alice") / "new", f"carol is gone ({mark})")
    assert b"Return-Path: <>" in home
    forged = srs.replace("=example.org=", "=victim.example=")
    with smtplib.SMTP(B_IP, hosts.b.smtp_port, timeout=20) as s:
        s.ehlo("mx.remote.test")
        s.mail("")
        code, _ = s.rcpt(forged)
    assert code == 550  # a forged SRS address is no open relay
