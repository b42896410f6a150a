"""ACME: the renewal decision (pure), the HTTP-01 responder, and orders against a real CA
(Debian's `pebble` on loopback, resolving the test domain through our loopback DNS server)."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tests.support import pebble
from tests.support.server import free_port, port_listening

from mailhaven.config import Acme
from mailhaven.net import acme, selfsigned
from mailhaven.net.tls import ReloadableTLS

DOMAIN = pebble.DOMAIN  # the name `acme_ca` issues for
NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)


def info(days_left: float, names: tuple[str, ...] = (DOMAIN,), *, self_signed: bool = False
         ) -> acme.CertInfo:
    return acme.CertInfo(frozenset(names), NOW + datetime.timedelta(days=days_left), self_signed)


def decide(cert: acme.CertInfo | None, domains: tuple[str, ...] = (DOMAIN,)) -> acme.Decision:
    return acme.decide(cert, domains, NOW, renew_before_days=30, check_interval=43200)


# ------------------------------------------------------------------ decisions


def test_renews_without_a_certificate_or_with_the_placeholder() -> None:
    assert decide(None).renew
    placeholder = decide(info(365, self_signed=True))
    assert placeholder.renew and "self-signed" in placeholder.reason


def test_renews_when_a_domain_is_missing() -> None:
    decision = decide(info(80), (DOMAIN, "Other.example.test"))
    assert decision.renew and "other.example.test" in decision.reason


def test_renews_inside_the_window_only() -> None:
    assert decide(info(29.5)).renew
    assert decide(info(-1)).renew  # expired: renew too
    later = decide(info(90))
    assert not later.renew and later.next_check == 43200


def test_next_check_never_passes_the_renewal_date() -> None:
    decision = decide(info(30 + 1 / 24))  # due in an hour, well before the next 12 h check
    assert not decision.renew and decision.next_check == pytest.approx(3600)


def test_read_cert_of_the_placeholder(tmp_path: Path) -> None:
    paths = acme.Paths(tmp_path)
    acme.placeholder(paths, DOMAIN, selfsigned.create)
    cert = acme.read_cert(paths.cert)
    assert cert is not None and cert.self_signed and DOMAIN in cert.names
    assert acme.read_cert(tmp_path / "missing.pem") is None


# ------------------------------------------------------------------ HTTP-01 responder


def test_responder_answers_only_pending_tokens() -> None:
    responder = acme.Http01Responder("127.0.0.1", 0)
    responder.tokens["tok"] = "tok.thumb"
    assert responder.answer(b"GET /.well-known/acme-challenge/tok HTTP/1.1\r\n\r\n") == (
        "200 OK", b"tok.thumb")
    assert responder.answer(b"GET /.well-known/acme-challenge/other HTTP/1.1\r\n\r\n")[0] == (
        "404 Not Found")
    assert responder.answer(b"GET / HTTP/1.1\r\n\r\n")[0] == "404 Not Found"
    assert responder.answer(b"POST /.well-known/acme-challenge/tok HTTP/1.1\r\n\r\n")[0] == (
        "405 Method Not Allowed")


async def test_responder_over_a_socket() -> None:
    port = free_port()
    responder = acme.Http01Responder("127.0.0.1", port)
    responder.tokens["abc"] = "abc.xyz"
    await responder.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /.well-known/acme-challenge/abc HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nabc.xyz")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x" * (acme.MAX_REQUEST_HEAD * 16))  # no end of head: refused, not held
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 400 ")
    finally:
        await responder.close()


# ------------------------------------------------------------------ against pebble


needs_pebble = pytest.mark.skipif(
    not pebble.available(), reason="pebble (Debian package) is not installed: "
    "scripts/install-test-deps installs it")


def settings(acme_ca: pebble.AcmeCA, **override: Any) -> Acme:
    table = acme_ca.acme_table(**override)
    return Acme(**{**table, "domains": tuple(table["domains"])})


def manager(tmp_path: Path, settings: Acme) -> acme.AcmeManager:
    paths = acme.Paths(tmp_path / "acme")
    acme.placeholder(paths, DOMAIN, selfsigned.create)
    return acme.AcmeManager(settings, paths, ReloadableTLS(paths.cert, paths.key))


def issuer_chain_verifies(chain_pem: bytes, root_pem: str) -> bool:
    """The leaf verifies against pebble's root, through the intermediate in the chain."""
    certs = x509.load_pem_x509_certificates(chain_pem)
    root = x509.load_pem_x509_certificate(root_pem.encode())
    leaf, intermediate = certs[0], certs[1]
    leaf.verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(root)
    return True


def chain_leaf(chain_pem: bytes) -> bytes:
    return x509.load_pem_x509_certificates(chain_pem)[0].public_bytes(
        serialization.Encoding.DER)


async def handshake_leaf(server_ctx: ssl.SSLContext, root_pem: str) -> bytes:
    """The certificate a verifying client (trusting pebble's root, SNI DOMAIN) receives."""
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    client_ctx = ssl.create_default_context(cadata=root_pem)
    try:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname=DOMAIN)
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        writer.close()
        return bytes(der)
    finally:
        server.close()
        await server.wait_closed()


@needs_pebble
async def test_obtains_a_certificate_and_serves_it(acme_ca: pebble.AcmeCA, tmp_path: Path) -> None:
    m = manager(tmp_path, settings(acme_ca))
    placeholder = m.paths.cert.read_bytes()
    next_check = await m.check()
    assert next_check == Acme().check_interval
    chain = m.paths.cert.read_bytes()
    assert chain != placeholder
    assert issuer_chain_verifies(chain, acme_ca.pebble.root_pem())
    cert = acme.read_cert(m.paths.cert)
    assert cert is not None and cert.names == {DOMAIN} and not cert.self_signed
    assert (m.paths.key.stat().st_mode & 0o777) == 0o600
    # the listener-facing context hands out the new certificate, no restart
    assert await handshake_leaf(m.tls.context, acme_ca.pebble.root_pem()) == chain_leaf(chain)
    # the port is free again: the responder only listens during an order
    assert port_listening(acme_ca.http_port) is not True


@needs_pebble
async def test_ca_down_keeps_the_certificate(
    acme_ca: pebble.AcmeCA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    m = manager(tmp_path, settings(acme_ca))
    await m.check()
    issued = m.paths.cert.read_bytes()
    root = acme_ca.pebble.root_pem()
    acme_ca.pebble.stop()
    renew_now = acme.AcmeManager(
        settings(acme_ca, renew_before_days=100000.0, check_interval=5.0),
        m.paths, m.tls)
    with caplog.at_level(logging.ERROR, logger="mailhaven.acme"):
        retry = await renew_now.check()
    assert retry == 5.0
    assert m.paths.cert.read_bytes() == issued
    assert "failed, keeping the current certificate" in caplog.text
    assert "Connection refused" in caplog.text or "ConnectionError" in caplog.text
    assert await handshake_leaf(m.tls.context, root) == chain_leaf(issued)


@needs_pebble
async def test_refused_order_keeps_the_placeholder(
    acme_ca: pebble.AcmeCA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A name our DNS does not know: pebble refuses the validation; nothing is replaced."""
    m = manager(tmp_path, settings(acme_ca, domains=["unknown.example.test"]))
    before = m.paths.cert.read_bytes()
    with caplog.at_level(logging.ERROR, logger="mailhaven.acme"):
        retry = await m.check()
    assert retry == acme.RETRY_AFTER_FAILURE
    assert m.paths.cert.read_bytes() == before
    assert "unknown.example.test" in caplog.text and "keeping the current certificate" in (
        caplog.text)


# ------------------------------------------------------------------ without a CA


async def test_responder_port_in_use_is_a_clear_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The HTTP-01 port is taken: the order is not even started, the placeholder stays."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        m = manager(tmp_path, Acme(
            domains=(DOMAIN,), directory="https://127.0.0.1:1/dir",
            http01_listen=f"127.0.0.1:{port}"))
        before = m.paths.cert.read_bytes()
        with caplog.at_level(logging.ERROR, logger="mailhaven.acme"):
            assert await m.check() == acme.RETRY_AFTER_FAILURE
    assert m.paths.cert.read_bytes() == before
    assert f"the HTTP-01 responder cannot listen on 127.0.0.1:{port}" in caplog.text


async def served_der(ctx: ssl.SSLContext) -> bytes:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=ctx)
    client = ssl.create_default_context()
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE  # self-signed test certificates: looked at, not trusted
    try:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", server.sockets[0].getsockname()[1], ssl=client)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        return bytes(der)
    finally:
        server.close()
        await server.wait_closed()


async def test_worker_follows_the_daemons_new_certificate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = acme.Paths(tmp_path / "acme")
    acme.placeholder(paths, "old.example.test", selfsigned.create)
    tls = ReloadableTLS(paths.cert, paths.key)
    old = await served_der(tls.context)
    task = asyncio.ensure_future(acme.follow(tls, 0.02))
    try:
        # a broken file (e.g. caught half-written by another tool) is logged, the old one stays
        (tmp_path / "junk.pem").write_text("not a certificate")
        os.replace(tmp_path / "junk.pem", paths.cert)
        for _ in range(500):  # bounded: 10 s at most
            if "keeping the current certificate" in caplog.text:
                break
            await asyncio.sleep(0.02)
        assert "keeping the current certificate" in caplog.text
        assert await served_der(tls.context) == old
        # what the daemon installs: made beside, renamed over
        selfsigned.create(tmp_path / "new.crt", tmp_path / "new.key", "new.example.test")
        os.replace(tmp_path / "new.key", paths.key)
        os.replace(tmp_path / "new.crt", paths.cert)
        new = old
        for _ in range(500):
            if (new := await served_der(tls.context)) != old:
                break
            await asyncio.sleep(0.02)
        assert x509.load_der_x509_certificate(new).subject.rfc4514_string() == (
            "CN=new.example.test")
    finally:
        task.cancel()


@needs_pebble
async def test_order_refused_by_the_ca_says_why(
    acme_ca: pebble.AcmeCA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Pebble refuses the order itself (a name with `_`): its problem detail is logged."""
    m = manager(tmp_path, settings(acme_ca, domains=["bad_name.example.test"]))
    before = m.paths.cert.read_bytes()
    with caplog.at_level(logging.ERROR, logger="mailhaven.acme"):
        assert await m.check() == acme.RETRY_AFTER_FAILURE
    assert m.paths.cert.read_bytes() == before
    assert "the ACME server refused the request: " in caplog.text
    assert "illegal character" in caplog.text and "acme:error:malformed" in caplog.text


# ------------------------------------------------------------------ TLS-ALPN-01 (RFC 8737)


@needs_pebble
async def test_obtains_a_certificate_over_tls_alpn_01(
    acme_ca: pebble.AcmeCA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # HTTP-01 off; the responder on a port pebble does not use: validation fails
    elsewhere = manager(tmp_path / "elsewhere", settings(
        acme_ca, http01_listen="", tls_alpn01_listen=f"127.0.0.1:{free_port()}"))
    with caplog.at_level(logging.ERROR, logger="mailhaven.acme"):
        assert await elsewhere.check() == acme.RETRY_AFTER_FAILURE
    assert "validation failed: mail.example.test" in caplog.text
    # on pebble's tlsPort: issued
    m = manager(tmp_path, settings(acme_ca, http01_listen="",
                                   tls_alpn01_listen=f"127.0.0.1:{acme_ca.tls_port}"))
    assert await m.check() == Acme().check_interval
    chain = m.paths.cert.read_bytes()
    assert issuer_chain_verifies(chain, acme_ca.pebble.root_pem())
    assert port_listening(acme_ca.tls_port) is not True


async def test_alpn_responder_shows_the_challenge_certificate() -> None:
    import hashlib

    from mailhaven.net import acme_alpn

    port = free_port()
    responder = acme_alpn.Responder("127.0.0.1", port)
    responder.add(DOMAIN, "token.thumbprint")
    await responder.start()
    client = ssl.create_default_context()
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE  # the CA checks the extension, not a chain
    client.set_alpn_protocols([acme_alpn.ALPN_PROTOCOL])
    try:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname=DOMAIN)
        tls = writer.get_extra_info("ssl_object")
        assert tls.selected_alpn_protocol() == "acme-tls/1"
        cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
        writer.close()
        extension = cert.extensions.get_extension_for_oid(acme_alpn.ACME_IDENTIFIER)
        assert extension.critical
        digest = hashlib.sha256(b"token.thumbprint").digest()
        assert extension.value.public_bytes() == b"\x04\x20" + digest
        with pytest.raises((ssl.SSLError, ConnectionError)):  # no pending challenge: refused
            await asyncio.open_connection(
                "127.0.0.1", port, ssl=client, server_hostname="other.example.test")
    finally:
        await responder.close()


@needs_pebble
async def test_untrusted_ca_certificate_is_a_clear_error(
    acme_ca: pebble.AcmeCA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without `directory_ca` pebble's HTTPS is not trusted: refused, logged, nothing replaced."""
    m = manager(tmp_path, settings(acme_ca, directory_ca=""))
    before = m.paths.cert.read_bytes()
    with caplog.at_level(logging.ERROR, logger="mailhaven.acme"):
        assert await m.check() == acme.RETRY_AFTER_FAILURE
    assert m.paths.cert.read_bytes() == before
    assert "cannot reach the ACME server" in caplog.text
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text


def test_the_service_of_a_process_is_by_its_role(tmp_path: Path) -> None:
    """Off without domains or TLS; the daemon orders, a worker follows the daemon's file."""
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    selfsigned.create(cert, key, DOMAIN)
    tls = ReloadableTLS(cert, key)
    settings = Acme(domains=(DOMAIN,), directory="https://ca.invalid/dir")
    assert acme.service(Acme(), tmp_path, tls, orders=True) is None
    assert acme.service(settings, tmp_path, None, orders=True) is None
    for orders, name in ((True, "run"), (False, "follow")):
        task = acme.service(settings, tmp_path, tls, orders=orders)
        assert task is not None and task.__name__ == name
        task.close()
