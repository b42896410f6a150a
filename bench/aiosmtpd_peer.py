"""The aiosmtpd peer: an aiosmtpd 1.4 receiver that stores each message durably.

For every message: write `<spool>/tmp/<name>`, fsync, rename into `<spool>/new/<name>`, then
answer 250 - the same promise as mailhaven's accept-only mode. The blocking part runs in
`asyncio.to_thread`, which is what a careful aiosmtpd handler does.

    python bench/aiosmtpd_peer.py --port PORT --spool DIR

Listens on 127.0.0.1 only; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal

from aiosmtpd.smtp import SMTP, Envelope, Session


class DurableHandler:
    def __init__(self, spool: str) -> None:
        self.tmp = os.path.join(spool, "tmp")
        self.new = os.path.join(spool, "new")
        os.makedirs(self.tmp, exist_ok=True)
        os.makedirs(self.new, exist_ok=True)
        self.names = (f"{os.getpid()}.{n}" for n in itertools.count())

    def store(self, name: str, data: bytes) -> None:
        path = os.path.join(self.tmp, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(path, os.path.join(self.new, name))

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        name = next(self.names)
        head = f"Return-Path: <{envelope.mail_from}>\r\n".encode()
        body = envelope.original_content or b""
        await asyncio.to_thread(self.store, name, head + body)
        return f"250 2.0.0 Ok: queued as {name}"


async def serve(port: int, spool: str) -> None:
    handler = DurableHandler(spool)
    loop = asyncio.get_running_loop()
    # An explicit hostname: otherwise aiosmtpd resolves its FQDN for every connection.
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="aiosmtpd.bench.test", data_size_limit=256 * 2**20),
        "127.0.0.1", port, backlog=1024, reuse_address=True)
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    server.close()
    await server.wait_closed()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--spool", required=True)
    args = ap.parse_args()
    asyncio.run(serve(args.port, args.spool))


if __name__ == "__main__":
    main()
