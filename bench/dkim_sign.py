"""What DKIM signing costs the event loop's process per message, inline and with the helper.

    .venv/bin/python bench/dkim_sign.py [--count 2000]

Signs a 1 KiB message `--count` times through `signing.outbound.Outbound._sign` with an
RSA-2048 key, then with RSA-2048 + Ed25519, each once in the server process (`[dkim] helper =
false`) and once with the helper process, ten signings in flight (as ten sessions would be).
Prints, per variant, this process's CPU (user + system, the helper's not included) and the
helper's CPU per message, and the wall time. Keys are made in a temporary directory. The
relay A/B with the whole server is `bench/ab.py relay --b-set dkim.key_dir=...`.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from pathlib import Path

from mailhaven.signing import keys as keystore
from mailhaven.signing.canon import split_message
from mailhaven.signing.outbound import Outbound

MESSAGE = (
    b"Received: from client.bench.test (localhost [127.0.0.1])\r\n"
    b"\tby mh.bench.test (mailhaven) with ESMTP id 4Q2ABCDEF; Fri, 4 Dec 2026 10:00:00 +0000\r\n"
    b"From: <sender@bench.test>\r\nTo: <rcpt@bench.test>\r\n"
    b"Date: Fri, 4 Dec 2026 10:00:00 +0000\r\nMessage-Id: <1.2@client.bench.test>\r\n\r\n"
    + (b"x" * 78 + b"\r\n") * 12
)


def usage(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


async def run(keys: dict[str, list[keystore.SigningKey]], helper: bool, count: int) -> str:
    hook = Outbound(keys=keys, arc_key=None, srs=None, server_id="mh.bench.test",
                    is_local_domain=lambda d: False, helper=helper)
    head, body = split_message(MESSAGE)
    await hook._sign("warm", head, body, 1)  # starts the helper
    own, kids, t0 = usage(resource.RUSAGE_SELF), usage(resource.RUSAGE_CHILDREN), time.perf_counter()

    async def session(n: int) -> None:
        for i in range(n):
            await hook._sign("Q", head, body, i)

    await asyncio.gather(*(session(count // 10) for _ in range(10)))
    await hook.close()  # the helper's CPU is counted once it has exited
    wall = time.perf_counter() - t0
    own = usage(resource.RUSAGE_SELF) - own
    kids = usage(resource.RUSAGE_CHILDREN) - kids
    return (f"loop process {own / count * 1e3:.3f} ms/msg, helper {kids / count * 1e3:.3f} "
            f"ms/msg, wall {wall / count * 1e3:.3f} ms/msg")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=2000)
    count = ap.parse_args().count
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        keystore.generate(folder / "rsa", "bench.test", "rsa", "rsa")
        keystore.generate(folder / "dual", "bench.test", "rsa", "rsa")
        keystore.generate(folder / "dual", "bench.test", "ed", "ed25519")
        for name in ("rsa", "dual"):
            keys = keystore.load_all(folder / name, {})
            for helper in (False, True):
                line = asyncio.run(run(keys, helper, count))
                print(f"{name:4} {'helper' if helper else 'inline':6}: {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
