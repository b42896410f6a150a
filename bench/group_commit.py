"""Group-commit throughput (a benchmark, not a test): N commits of SIZE bytes from C tasks.

Run: .venv/bin/python bench/group_commit.py [directory on the disk to measure]
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

from mailhaven.proto.envelope import Envelope, RecipientSpec
from mailhaven.spool import QueuedRecipient, Spool


async def run(n: int, conc: int, size: int, root: Path) -> None:
    s = Spool(root)
    s.open()
    env = Envelope("a@example.org", (RecipientSpec("b@example.net"),))
    body = b"x" * size
    sem = asyncio.Semaphore(conc)
    async def one() -> None:
        async with sem:
            w = s.new_message()
            w.write(body)
            rcpts = [QueuedRecipient("b@example.net", "b@example.net")]
            await s.commit(w, env, rcpts, b"Received: by x\r\n")
    t = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    dt = time.perf_counter() - t
    st = s.stats
    s.close()
    print(
        f"n={n} conc={conc} size={size}: {n / dt:,.0f} msg/s,"
        f" {st.transactions} transactions, largest batch {st.largest_batch}"
    )


def main() -> None:
    base = sys.argv[1] if len(sys.argv) > 1 else None
    for conc, size, n in [(1, 1024, 500), (50, 1024, 2000), (200, 1024, 5000), (50, 200_000, 300)]:
        root = Path(tempfile.mkdtemp(dir=base))
        try:
            asyncio.run(run(n, conc, size, root))
        finally:
            shutil.rmtree(root)


if __name__ == "__main__":
    main()
