"""Server TLS contexts: protocol floor, cipher policy, certificate reload while serving."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
import trustme

from mailhaven.net.tls import ReloadableTLS, build_server_context


def write_cert(ca: trustme.CA, path: Path) -> str:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(path))
    return cert.cert_chain_pems[0].bytes().decode()


def test_policy(ca: trustme.CA, tmp_path: Path) -> None:
    write_cert(ca, tmp_path / "c.pem")
    ctx = build_server_context(tmp_path / "c.pem", tmp_path / "c.pem")
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all(c["aead"] and c["kea"] in ("kx-ecdhe", "kx-dhe") for c in tls12)


def test_broken_files_raise(tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises((ssl.SSLError, OSError)):
        build_server_context(tmp_path / "bad.pem", tmp_path / "bad.pem")


async def peer_cert(port: int, ca: trustme.CA, *, tls12: bool = False) -> tuple[bytes, str]:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                   server_hostname="localhost")
    sslobj = writer.get_extra_info("ssl_object")
    der, version = sslobj.getpeercert(binary_form=True), sslobj.version()
    await reader.read()
    writer.close()
    return der, version


async def test_reload_swaps_certificate_for_new_connections(ca: trustme.CA, tmp_path: Path) -> None:
    pem = tmp_path / "c.pem"
    first = write_cert(ca, pem)
    tls = ReloadableTLS(pem, pem)

    async def handler(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=tls.context)
    port = server.sockets[0].getsockname()[1]
    try:
        der1, version = await peer_cert(port, ca)
        assert ssl.DER_cert_to_PEM_cert(der1) == first and version == "TLSv1.3"
        second = write_cert(ca, pem)
        tls.reload()
        der2, _ = await peer_cert(port, ca, tls12=True)
        assert ssl.DER_cert_to_PEM_cert(der2) == second
        pem.write_text("garbage")
        with pytest.raises((ssl.SSLError, OSError)):
            tls.reload()
        der3, _ = await peer_cert(port, ca)
        assert der3 == der2  # a failed reload keeps the old certificate in service
    finally:
        server.close()
        await server.wait_closed()


async def test_old_protocols_refused(ca: trustme.CA, tmp_path: Path) -> None:
    write_cert(ca, tmp_path / "c.pem")
    ctx = build_server_context(tmp_path / "c.pem", tmp_path / "c.pem")
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    with pytest.warns(DeprecationWarning):
        client.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.open_connection("127.0.0.1", port, ssl=client)
    finally:
        server.close()
        await server.wait_closed()


def handshake(server: ssl.SSLContext, client: ssl.SSLContext,
              session: ssl.SSLSession | None = None) -> ssl.SSLObject:
    """One handshake in memory, then one reply from the server (which carries TLS 1.3's
    session tickets to the client); the client's side of it."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    cli = client.wrap_bio(c_in, c_out, session=session)
    done: set[str] = set()
    for _ in range(10):  # bounded: a handshake is 2-3 flights
        for name, end, out, into in (("c", cli, c_out, s_in), ("s", srv, s_out, c_in)):
            try:
                end.do_handshake()
                done.add(name)
            except ssl.SSLWantReadError:
                pass
            into.write(out.read())
        if done == {"c", "s"}:
            break
    assert done == {"c", "s"}
    srv.write(b"250 ok\r\n")
    c_in.write(s_out.read())
    assert cli.read(100) == b"250 ok\r\n"
    return cli


@pytest.mark.parametrize("tls12", [False, True])
def test_sessions_resume_also_after_reload(ca: trustme.CA, tmp_path: Path, tls12: bool) -> None:
    """Session tickets are on: a returning sender skips the certificate signature. The tickets'
    keys belong to the listener-facing context, so swapping the certificate keeps them valid."""
    pem = tmp_path / "c.pem"
    write_cert(ca, pem)
    tls = ReloadableTLS(pem, pem)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    if tls12:
        client.maximum_version = ssl.TLSVersion.TLSv1_2
    first = handshake(tls.context, client)
    assert first.version() == ("TLSv1.2" if tls12 else "TLSv1.3") and not first.session_reused
    again = handshake(tls.context, client, first.session)
    assert again.session_reused
    write_cert(ca, pem)
    tls.reload()
    assert handshake(tls.context, client, again.session).session_reused
