"""What DKIM signing costs the event loop's thread per message: on the loop, in the signing
thread (the default), in the helper process (`[dkim] helper`).

    .venv/bin/python bench/dkim_sign.py [--count 2000]

Signs a 1 KiB message `--count` times through `signing.outbound.Outbound._sign` with an
RSA-2048 key, then with RSA-2048 + Ed25519, ten signings in flight (as ten sessions would be),
each way: `loop` (the private-key operations on the event loop's thread, what the server did
before the signing thread), `thread` and `helper`. Prints, per variant, the CPU of the loop's
thread (`time.thread_time`: what other sessions wait for), of this whole process (the signing
thread included) and of the helper, per message, and the wall time. Keys are made in a
temporary directory. The relay A/B with the whole server is `bench/ab.py relay --a-set
dkim.sign=false --b-set ...` (docs/benchmarks.md).
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


async def run(keys: dict[str, list[keystore.SigningKey]], how: str, count: int) -> str:
    hook = Outbound(keys=keys, arc_key=None, srs=None, server_id="mh.bench.test",
                    is_local_domain=lambda d: False, helper=how == "helper")
    if how == "loop":
        hook.signing.close()  # a closed signing thread runs the jobs in the caller's thread
    head, body = split_message(MESSAGE)
    await hook._sign("warm", head, body, 1)  # starts the helper or the thread
    own, kids, t0 = usage(resource.RUSAGE_SELF), usage(resource.RUSAGE_CHILDREN), time.perf_counter()
    loop_cpu = time.thread_time()

    async def session(n: int) -> None:
        for i in range(n):
            await hook._sign("Q", head, body, i)

    await asyncio.gather(*(session(count // 10) for _ in range(10)))
    loop_cpu = time.thread_time() - loop_cpu
    await hook.close()  # the helper's CPU is counted once it has exited
    wall = time.perf_counter() - t0
    own = usage(resource.RUSAGE_SELF) - own
    kids = usage(resource.RUSAGE_CHILDREN) - kids
    return (f"loop thread {loop_cpu / count * 1e3:.3f} ms/msg, process {own / count * 1e3:.3f} "
            f"ms/msg, helper {kids / count * 1e3:.3f} ms/msg, wall {wall / count * 1e3:.3f} ms/msg")


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
            for how in ("loop", "thread", "helper"):
                print(f"{name:4} {how:6}: {asyncio.run(run(keys, how, count))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
