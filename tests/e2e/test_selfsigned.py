"""End to end: the self-signed certificate made when no `tls.cert` is configured follows
`hostname` (a certificate made for an old name is made again, and that is logged)."""

from __future__ import annotations

import smtplib
import ssl

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from tests.e2e.conftest import ServerFactory
from tests.support.server import MailServer

pytestmark = pytest.mark.e2e


def served_names(server: MailServer) -> tuple[str, list[str]]:
    """The CN and DNS names of the certificate the submission listener serves."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # self-signed: we look at it, we do not trust it
    with smtplib.SMTP(server.host, server.port("submission"), timeout=20) as smtp:
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
