"""End to end: OpenDKIM (Debian's) as a signing milter on the submission listener.

alice submits over STARTTLS with AUTH; `submission_milters` sends the message to a private
OpenDKIM (`tests.support.opendkim`), whose DKIM-Signature is inserted at the top of the
client's header section (under our Received:) before the 250. The delivered copy verifies with
dkimpy against the key OpenDKIM signed with (its TXT record served by a stub resolver). Mail
received on the MX listener passes no milter (`milters` is empty there): not signed.
"""

from __future__ import annotations

import smtplib
import ssl
import uuid
from pathlib import Path

import dkim
import pytest
import trustme
from argon2 import PasswordHasher
from tests.e2e.conftest import ServerFactory
from tests.support import opendkim
from tests.support.server import MailServer

from mailhaven.mailbox.users import UserDB

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
    module_mail_server: ServerFactory,
    signer: opendkim.OpenDKIMInstance,
) -> tuple[MailServer, Path]:
    directory = tmp_path_factory.mktemp("dkim")
    ca = trustme.CA()
    chain = directory / "server.pem"
    ca.issue_cert("mx.test", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(chain))
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    users = UserDB(directory / "users.passwd", hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
    users.add("alice", "secret")
    server = module_mail_server(
        settings={
            "local_domains": ["example.org"],
            "users_file": str(directory / "users.passwd"),
            "tls": {"cert": str(chain), "key": str(chain)},
            "checks": {"milter": {"submission": [signer.spec]}},
        },
        services=("smtp", "submission"),
    )
    return server, ca_file


def message(mark: str) -> str:
    return (
        f"From: alice@example.org\r\nTo: alice@example.org\r\nSubject: signed {mark}\r\n"
        f"Date: Fri, 04 Dec 2026 12:00:00 +0000\r\nMessage-ID: <{mark}@example.org>\r\n"
        f"\r\nbody {mark}\r\n"
    )


def test_submission_is_signed_and_verifies(
    setup: tuple[MailServer, Path], signer: opendkim.OpenDKIMInstance
) -> None:
    server, ca_file = setup
    mark = uuid.uuid4().hex
    with smtplib.SMTP(server.host, server.port("submission")) as client:
        client.starttls(context=ssl.create_default_context(cafile=str(ca_file)))
        client.login("alice", "secret")
        client.sendmail("alice@example.org", ["alice@example.org"], message(mark))
    data = server.wait_for_mark("alice", mark)
    header = data.split(b"\r\n\r\n", 1)[0].decode()
    names = [line.split(":", 1)[0] for line in header.splitlines() if line[:1] not in " \t"]
    assert names.index("DKIM-Signature") == names.index("Received") + 1
    assert "d=example.org; s=test;" in header

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"test._domainkey.example.org."
        return signer.txt_record

    # the stored copy starts with Return-Path/Delivered-To added by local delivery: fine for
    # DKIM, which signs only From/To/Subject/... (h=) and the body
    assert dkim.verify(data, dnsfunc=dnsfunc)
    server.wait_for_log(rf": milter inet:127\.0\.0\.1:{signer.port}: InsertHeader=1")


def test_mx_mail_is_not_signed(setup: tuple[MailServer, Path]) -> None:
    server, _ = setup
    mark = uuid.uuid4().hex
    with smtplib.SMTP(server.host, server.smtp_port) as client:
        client.sendmail("bob@example.com", ["alice@example.org"], message(mark))
    assert b"DKIM-Signature" not in server.wait_for_mark("alice", mark)
