"""A trivial STARTTLS SMTP sink: says yes to everything, stores nothing.

    .venv/bin/python bench/tls_sink.py --port PORT --cert C --key K [--processes 2]

Why: the TLS scenario's load client (tls_load.py) is Python; its ceiling is what it reaches
against a server that does almost nothing but the handshake, so a server measured well below
that ceiling is measured, not the client. Our own protocol code, no mailhaven import: a few
lines per command on uvloop, `loop.start_tls` with a default server context (TLS 1.2-1.3,
session tickets on), one process per core sharing one listening socket.

Listens on 127.0.0.1 only; each process exits on SIGTERM; the parent stops its children by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import ssl
import sys
from typing import cast


class Sink(asyncio.Protocol):
    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.buf = b""
        self.in_data = False
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.transport.write(b"220 sink.bench.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out = []
        while self.transport is not None:
            if self.in_data:
                end = self.buf.find(b"\r\n.\r\n")
                if end < 0:
                    self.buf = self.buf[-4:]
                    break
                self.buf = self.buf[end + 5:]
                self.in_data = False
                out.append(b"250 2.0.0 Ok: discarded\r\n")
                continue
            line, sep, rest = self.buf.partition(b"\r\n")
            if not sep:
                break
            self.buf = rest
            verb = line[:4].upper()
            if verb == b"EHLO":
                out.append(b"250-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                           b"250 STARTTLS\r\n")
            elif verb == b"DATA":
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                self.in_data = True
                self.buf = b"\r\n" + self.buf  # the DATA line's CRLF: an empty message ends
            elif verb == b"STAR":
                self.transport.write(b"".join(out) + b"220 2.0.0 Ready to start TLS\r\n")
                self.transport.pause_reading()
                self.buf = b""  # plaintext after STARTTLS is dropped, as a server must
                self.task = asyncio.get_running_loop().create_task(
                    self.starttls(self.transport))  # held: the loop keeps only weak refs
                self.transport = None
                return
            elif verb == b"QUIT":
                self.transport.write(b"".join(out) + b"221 2.0.0 Bye\r\n")
                self.transport.close()
                return
            else:
                out.append(b"250 2.0.0 Ok\r\n")
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    async def starttls(self, raw: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(raw, self, self.ctx, server_side=True,
                                       ssl_handshake_timeout=30)
        except (OSError, TimeoutError):  # ssl.SSLError and resets are OSErrors
            raw.abort()
            return
        self.transport = cast(asyncio.Transport, new)
        if self.buf:  # the client's first command came with its Finished
            self.data_received(b"")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


def serve(sock: socket.socket, ctx: ssl.SSLContext) -> None:
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
        server = await loop.create_server(lambda: Sink(ctx), sock=sock, backlog=1024)
        async with server:
            await stop

    uvloop.run(main())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(a.cert, a.key)
    sock = socket.create_server(("127.0.0.1", a.port), backlog=1024)
    sock.setblocking(False)
    kids = []
    for _ in range(a.processes):
        pid = os.fork()
        if pid == 0:
            serve(sock, ctx)
            os._exit(0)
        kids.append(pid)
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        signal.pause()
    finally:
        for pid in kids:
            os.kill(pid, signal.SIGTERM)
        for pid in kids:
            os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
