"""LMTP as the last hop: mailhaven's LMTP listener against Dovecot's LMTP, side by side.

One client (mailhaven's own LMTP transport, `delivery.lmtp.LmtpAgent`) delivers the same
messages, one connection and one recipient each, into two stores on loopback TCP: a private
Dovecot (`dovecot-lmtpd`, Maildir, no Sieve script) and `mailhaven serve` with `[listen] lmtp`.
Rounds alternate between the two so machine load hits both alike; the result is messages per
second per store and their ratio. Both stores fsync each message before answering 250.

Run from the repository root as root (Dovecot needs it): `.venv/bin/python bench/lmtp_store.py
[MESSAGES] [ROUNDS]`. Results are printed, not committed (docs/benchmarks.md takes a summary).
"""

from __future__ import annotations

import asyncio
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.dovecot_lmtp import DovecotStore
from tests.support.server import MailServer

from mailhaven.delivery.base import DeliveryRequest
from mailhaven.delivery.lmtp import LmtpAgent
from mailhaven.proto.envelope import Envelope, RecipientSpec
from mailhaven.routing.route import Route

BODY = b"From: s@remote.example\r\nSubject: bench\r\n\r\n" + b"y" * 4000 + b"\r\n"


def request(hop: str, rcpt: str) -> DeliveryRequest:
    env = Envelope(sender="s@remote.example", recipients=(RecipientSpec(rcpt),))

    def open_message() -> BinaryIO:
        return io.BytesIO(BODY)

    return DeliveryRequest("BENCH", env, (rcpt,), Route("lmtp", hop), open_message, len(BODY))


async def round_trip(hop: str, rcpt: str, count: int) -> float:
    agent = LmtpAgent("bench.example")
    start = time.perf_counter()
    for _ in range(count):
        result = await agent.deliver(request(hop, rcpt))
        assert result.replies[rcpt].code == 250, result.replies[rcpt]
    return count / (time.perf_counter() - start)


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    with tempfile.TemporaryDirectory(prefix="bench-lmtp-") as tmp:
        base = Path(tmp)
        dovecot = DovecotStore(base).start()
        server = MailServer(base, services=("lmtp",), settings={
            "local_users": ["postmaster", "alice"], "log_level": "warning"})
        server.start()
        try:
            ours = f"[127.0.0.1]:{server.port('lmtp')}"
            theirs = f"[127.0.0.1]:{dovecot.lmtp_port}"
            rates: dict[str, list[float]] = {"mailhaven": [], "dovecot": []}
            for _ in range(rounds):
                rates["dovecot"].append(asyncio.run(round_trip(theirs, "alice@store.example",
                                                               count)))
                rates["mailhaven"].append(asyncio.run(round_trip(ours, "alice@localhost", count)))
        finally:
            server.stop()
            dovecot.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    for name, values in rates.items():
        print(f"{name:10s} median {med[name]:7.1f} msg/s  rounds {[round(v) for v in values]}")
    print(f"ratio mailhaven/dovecot {med['mailhaven'] / med['dovecot']:.2f} "
          f"({count} messages x {rounds} rounds, 4 KB, one connection per message)")


if __name__ == "__main__":
    main()
