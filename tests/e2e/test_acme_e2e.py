"""End to end: a real `mailhaven serve` with `[tls] acme` orders its certificate from a real
ACME CA (Debian's pebble on loopback), serves it on STARTTLS, replaces it on renewal without a
restart, and keeps serving the last good one while the CA is down."""

from __future__ import annotations

import smtplib
import socket
import ssl
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tests.e2e.conftest import ServerFactory
from tests.support import pebble
from tests.support.server import MailServer, free_port

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not pebble.available(), reason="pebble (Debian package) is not "
                       "installed: scripts/install-test-deps installs it"),
]

DOMAIN = pebble.DOMAIN  # the name `acme_ca` issues for
#: Every check orders anew (more days than pebble's certificates last), one check a second:
#: renewals happen while the test watches.
RENEW_ALWAYS = {"renew_before_days": 100000, "check_interval": 1}
ORDER_TIMEOUT = 60.0


def starttls_leaf(server: MailServer, root_pem: str) -> bytes:
    """The certificate a STARTTLS client trusting only pebble's root gets (verified), as DER.
    The client connects to 127.0.0.1, so the name is checked here rather than by `ssl`."""
    ctx = ssl.create_default_context(cadata=root_pem)
    ctx.check_hostname = False  # the chain is still verified (CERT_REQUIRED)
    with smtplib.SMTP(server.host, server.port("submission"), timeout=20) as smtp:
        smtp.starttls(context=ctx)
        sock = smtp.sock
        assert isinstance(sock, ssl.SSLSocket)
        der = sock.getpeercert(binary_form=True)
        assert smtp.ehlo()[0] == 250
    assert der is not None
    san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [DOMAIN]
    return der


def installed_leaf(server: MailServer) -> bytes:
    chain = (server.state_dir / "acme" / "cert.pem").read_bytes()
    return x509.load_pem_x509_certificates(chain)[0].public_bytes(serialization.Encoding.DER)


def test_acme_certificate_issued_renewed_and_kept_while_ca_is_down(
    mail_server: ServerFactory, acme_ca: pebble.AcmeCA
) -> None:
    server = mail_server(
        services=("smtp", "submission"),
        hostname=DOMAIN,
        settings={"tls": {"acme": acme_ca.acme_table(**RENEW_ALWAYS)}},
    )
    pid = server.pid
    root = acme_ca.pebble.root_pem()
    server.wait_for_log(r"acme: new certificate for mail\.example\.test in service",
                        timeout=ORDER_TIMEOUT)
    first = starttls_leaf(server, root)  # verifies: issued by pebble's intermediate
    issuer = x509.load_der_x509_certificate(first).issuer.rfc4514_string()
    assert "Pebble Intermediate CA" in issuer

    # renewal: a later certificate is served by the same process
    done = len(server.wait_for_log(r"acme: new certificate .* in service"))
    server.wait_for_log(r"acme: new certificate .* in service", count=done + 2,
                        timeout=ORDER_TIMEOUT)
    renewed = starttls_leaf(server, root)
    assert renewed != first
    assert server.pid == pid and server.running

    # the CA goes away: the error is logged, the last certificate stays, mail still flows
    acme_ca.pebble.stop()
    server.wait_for_log(r"acme: order for mail\.example\.test failed, keeping the current "
                        r"certificate: cannot reach the ACME server", timeout=ORDER_TIMEOUT)
    kept = installed_leaf(server)
    assert starttls_leaf(server, root) == kept
    failures = len(server.wait_for_log(r"keeping the current certificate"))
    server.wait_for_log(r"keeping the current certificate", count=failures + 1,
                        timeout=ORDER_TIMEOUT)
    assert starttls_leaf(server, root) == kept == installed_leaf(server)
    with smtplib.SMTP(server.host, server.smtp_port, timeout=20) as smtp:
        assert smtp.ehlo()[0] == 250
    assert server.pid == pid and server.running
    assert "Traceback" not in server.log()


def test_stop_does_not_wait_for_an_order_in_flight(mail_server: ServerFactory) -> None:
    """A CA that accepts the connection and never answers: SIGTERM still stops the daemon
    promptly (the order's blocking thread must not hold the exit for its network timeout)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete in the backlog; nothing is ever sent
        port = silent.getsockname()[1]
        server = mail_server(
            services=("smtp", "submission"),
            hostname=DOMAIN,
            settings={"tls": {"acme": {
                "domains": [DOMAIN],
                "directory": f"https://127.0.0.1:{port}/dir",
                "http01_listen": f"127.0.0.1:{free_port()}",
            }}},
        )
        server.wait_for_log(r"acme: ordering a certificate for mail\.example\.test")
        time.sleep(0.5)  # let the order reach the silent server
        assert server.stop(timeout=10) == 0, server.log_tail()
    assert "stopped" in server.log()
