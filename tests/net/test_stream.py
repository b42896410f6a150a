"""net.stream: the owned buffer across STARTTLS, the timeouts of read/drain/handshake, and
backpressure, over real loopback connections on both event loops."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import trustme

from mailhaven.net.stream import MAX_INBOX, Stream

pytestmark = pytest.mark.both_loops


@dataclass
class Pair:
    server: Stream
    client: Stream


@pytest.fixture(scope="module")
def server_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.test").configure_cert(ctx)
    return ctx


@pytest.fixture(scope="module")
def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    """A server-side and a client-side Stream joined over loopback."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[Stream] = loop.create_future()
    server = await loop.create_server(lambda: Stream(accepted.set_result), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, client = await loop.create_connection(Stream, "127.0.0.1", port)
    ours = await asyncio.wait_for(accepted, 5)
    try:
        yield Pair(ours, client)
    finally:
        client.abort()
        ours.abort()
        server.close()


async def arrived(stream: Stream, size: int) -> None:
    """Wait (bounded) until `size` unread bytes sit in the stream's buffer, without reading."""
    for _ in range(500):
        if len(stream._inbox) >= size:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"only {len(stream._inbox)} of {size} bytes arrived")


async def read_exactly(stream: Stream, size: int) -> bytes:
    got = b""
    while len(got) < size:
        data = await stream.read(5)
        assert data, f"stream ended after {len(got)} of {size} bytes"
        got += data
    return got


async def test_plaintext_sent_before_the_handshake_is_never_read_as_tls(
    pair: Pair, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    pair.client.write(b"STARTTLS\r\n")
    assert await pair.server.read(5) == b"STARTTLS\r\n"
    # the CVE-2011-0411 attack: commands injected after STARTTLS, before the handshake
    pair.client.write(b"RCPT TO:<injected@evil.test>\r\n")
    await arrived(pair.server, 10)
    await asyncio.gather(
        pair.server.start_tls(server_ctx, server_side=True, timeout=5),
        pair.client.start_tls(client_ctx, server_side=False, server_hostname="mx.test",
                              timeout=5),
    )
    pair.client.write(b"EHLO client.test\r\n")
    assert await pair.server.read(5) == b"EHLO client.test\r\n"
    assert pair.server.extra("ssl_object") is not None
    pair.server.write(b"250 ok\r\n")
    assert await pair.client.read(5) == b"250 ok\r\n"


async def test_a_command_in_the_clients_finished_flight_is_kept(
    pair: Pair, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    # The client writes as soon as its side of the handshake is done (TLS 1.3: before the
    # server's start_tls returns): the decrypted bytes must wait in the buffer, not vanish.
    async def client() -> None:
        await pair.client.start_tls(client_ctx, server_side=False, server_hostname="mx.test",
                                    timeout=5)
        pair.client.write(b"CAPA\r\n")

    await asyncio.gather(pair.server.start_tls(server_ctx, server_side=True, timeout=5), client())
    assert await read_exactly(pair.server, 6) == b"CAPA\r\n"


async def test_a_client_that_checks_names_refuses_the_wrong_host(
    pair: Pair, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    results = await asyncio.gather(
        pair.server.start_tls(server_ctx, server_side=True, timeout=5),
        pair.client.start_tls(client_ctx, server_side=False, server_hostname="other.test",
                              timeout=5),
        return_exceptions=True,
    )
    assert isinstance(results[1], ssl.SSLCertVerificationError)


async def test_a_handshake_that_never_comes_is_cut_at_its_timeout(
    pair: Pair, server_ctx: ssl.SSLContext
) -> None:
    started = time.monotonic()
    with pytest.raises((TimeoutError, ConnectionError, ssl.SSLError)):
        await pair.server.start_tls(server_ctx, server_side=True, timeout=0.3)
    assert time.monotonic() - started < 3


async def test_no_handshake_on_a_connection_the_peer_closed(
    pair: Pair, server_ctx: ssl.SSLContext
) -> None:
    pair.client.close()
    assert await pair.server.read(5) == b""
    with pytest.raises(ConnectionResetError):
        await pair.server.start_tls(server_ctx, server_side=True, timeout=5)


async def test_read_returns_none_after_its_timeout_and_then_reads_on(pair: Pair) -> None:
    started = time.monotonic()
    assert await pair.server.read(0.1) is None
    assert 0.05 < time.monotonic() - started < 2
    pair.client.write(b"late\r\n")
    assert await pair.server.read(5) == b"late\r\n"


async def test_eof_reads_as_empty_bytes_after_the_last_data(pair: Pair) -> None:
    pair.client.write(b"QUIT\r\n")
    pair.client.close()
    assert await read_exactly(pair.server, 6) == b"QUIT\r\n"
    assert await pair.server.read(5) == b""
    assert await pair.server.read(5) == b""


async def test_stop_ends_a_pending_read(pair: Pair) -> None:
    reader = asyncio.ensure_future(pair.server.read(30))
    await asyncio.sleep(0.05)
    pair.server.stop()
    assert await asyncio.wait_for(reader, 2) is None
    assert pair.server.stopping
    pair.client.write(b"more\r\n")
    await arrived(pair.server, 6)
    assert await pair.server.read(5) is None  # stopped stays stopped


async def test_reading_pauses_past_max_inbox_and_resumes_when_read(pair: Pair) -> None:
    total = 8 * MAX_INBOX
    payload = bytes(range(256)) * (total // 256)
    pair.client.write(payload)
    await arrived(pair.server, MAX_INBOX + 1)
    await asyncio.sleep(0.2)  # time for more to arrive, were reading not paused
    assert pair.server.transport is not None
    assert not pair.server.transport.is_reading()
    # bounded: one socket read past the limit at most
    assert len(pair.server._inbox) <= MAX_INBOX + 256 * 1024
    first = await pair.server.read(5)
    assert first and len(first) < total
    assert pair.server.transport.is_reading()
    assert first + await read_exactly(pair.server, total - len(first)) == payload


async def test_drain_gives_up_on_a_peer_that_takes_nothing(pair: Pair) -> None:
    assert pair.client.transport is not None and pair.server.transport is not None
    pair.client.transport.pause_reading()  # the peer stops reading
    pair.server.transport.set_write_buffer_limits(high=64 * 1024)
    chunk = b"x" * (1024 * 1024)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        for _ in range(64):  # the kernel's socket buffers take a few MiB first
            pair.server.write(chunk)
            await pair.server.drain(0.2)
    assert time.monotonic() - started < 10


async def test_drain_raises_once_the_connection_is_lost(pair: Pair) -> None:
    pair.client.abort()
    assert await pair.server.read(5) == b""
    for _ in range(100):  # loss may be reported a loop turn or two after the EOF
        if pair.server._lost:
            break
        await asyncio.sleep(0.01)
    assert pair.server.closing
    pair.server.write(b"lost words\r\n")  # dropped, not an error
    with pytest.raises(ConnectionResetError):
        await pair.server.drain(1)


def test_a_stream_without_a_transport_is_closing() -> None:
    async def check() -> None:
        stream = Stream()
        assert stream.closing and stream.extra("peername") is None
        stream.write(b"nowhere")  # no transport: nothing to do, no error
        stream.close()
        stream.abort()

    asyncio.run(check())

