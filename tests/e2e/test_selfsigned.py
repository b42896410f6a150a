"""End to end: the self-signed certificate made when no `tls.cert` is configured follows
`hostname` (a certificate made for an old name is made again, and that is logged)."""

from __future__ import annotations

import smtplib
import ssl
import subprocess

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from tests.e2e.conftest import ServerFactory
from tests.support.server import MailServer

pytestmark = pytest.mark.e2e


def served_names(server: MailServer, service: str = "submission") -> tuple[str, list[str]]:
    """The CN and DNS names of the certificate `service` serves after STARTTLS."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # self-signed: we look at it, we do not trust it
    with smtplib.SMTP(server.host, server.port(service), timeout=20) as smtp:
        smtp.starttls(context=ctx)
        sock = smtp.sock
        assert isinstance(sock, ssl.SSLSocket)
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    [cn] = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return str(cn.value), san.get_values_for_type(x509.DNSName)


def test_selfsigned_certificate_follows_the_hostname(mail_server: ServerFactory) -> None:
    server = mail_server(services=("smtp", "submission"), hostname="a.example")
    assert served_names(server) == ("a.example", ["a.example", "localhost"])
    server.stop()
    server.update_config({"hostname": "b.example"})
    server.start()
    assert served_names(server) == ("b.example", ["b.example", "localhost"])
    server.wait_for_log(r"self-signed certificate .*a\.example.* made again for b\.example")
    server.stop()
    server.start()  # the name matches now: the certificate is kept
    assert served_names(server) == ("b.example", ["b.example", "localhost"])
    assert len(server.wait_for_log(r"made again for b\.example")) == 1


def test_an_mx_only_server_offers_starttls_with_its_own_certificate(
    mail_server: ServerFactory, swaks: str
) -> None:
    # Port 25 alone, no certificate configured: STARTTLS all the same (opportunistic TLS beats
    # cleartext; Debian's Postfix does it with its snakeoil certificate).
    server = mail_server(services=("smtp",), hostname="mx.example",
                         settings={"local_users": ["postmaster"]})
    with smtplib.SMTP(server.host, server.smtp_port, timeout=20) as smtp:
        smtp.ehlo("client.test")
        assert smtp.has_extn("starttls")
    assert served_names(server, "smtp") == ("mx.example", ["mx.example", "localhost"])
    result = subprocess.run(
        [swaks, "--server", f"{server.host}:{server.smtp_port}", "--tls",
         "--to", "postmaster@localhost", "--from", "a@example.org"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
    [delivered] = server.wait_for_messages("postmaster", 1)
    assert b"with ESMTPS" in delivered.read_bytes()
