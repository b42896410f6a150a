"""The lifeline pipe as the daemon's channel to its workers: the TLS ticket key a worker finds
at start, later keys (rotation) while it runs, and end of file when the daemon is gone."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from mailhaven.runtime.workers import WorkerPool, take_message, watch_lifeline

SIZE = 80


def test_take_message_finds_a_whole_message_or_none() -> None:
    for written, expected in ((b"k" * SIZE, b"k" * SIZE), (b"", None), (b"k" * 79, None)):
        read_end, write_end = os.pipe()
        try:
            os.write(write_end, written)
            assert take_message(read_end, SIZE) == expected
        finally:
            os.close(read_end)
            os.close(write_end)


async def test_watch_lifeline_delivers_messages_then_the_end() -> None:
    read_end, write_end = os.pipe()
    got: list[bytes] = []
    lost = asyncio.Event()
    watch_lifeline(read_end, lost.set, got.append, SIZE)
    try:
        one, two = b"a" * SIZE, b"b" * SIZE
        os.write(write_end, one + two[:30])  # a message split across reads
        await asyncio.sleep(0.05)
        assert got == [one]
        os.write(write_end, two[30:])
        os.close(write_end)
        await asyncio.wait_for(lost.wait(), 5)
        assert got == [one, two]
    finally:
        asyncio.get_running_loop().remove_reader(read_end)
        os.close(read_end)


#: a stand-in worker: writes each key it reads from its lifeline to a file, until end of file
FAKE_WORKER = """
import os, sys
fd = int(sys.argv[sys.argv.index("--lifeline") + 1])
with open(sys.argv[1], "ab", buffering=0) as out:
    while True:
        key = os.read(fd, 80)
        if not key:
            break
        out.write(key)
"""


async def wait_for_bytes(path: Path, size: int) -> bytes:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if path.exists() and len(data := path.read_bytes()) >= size:
            return data
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path}: fewer than {size} bytes")


async def test_workers_get_the_key_at_start_and_on_rotation(tmp_path: Path) -> None:
    first, second = os.urandom(SIZE), os.urandom(SIZE)
    pool = WorkerPool(2, None, [], ticket_key=first)
    outputs = [tmp_path / f"keys-{slot + 1}" for slot in range(2)]
    pool._argv = [sys.executable, "-c", FAKE_WORKER]
    real_spawn = pool._spawn

    async def spawn(slot: int) -> None:  # each fake worker writes to a file of its own
        pool._argv = [sys.executable, "-c", FAKE_WORKER, str(outputs[slot])]
        await real_spawn(slot)

    pool._spawn = spawn  # type: ignore[method-assign]
    await pool.start()
    try:
        for out in outputs:
            assert await wait_for_bytes(out, SIZE) == first
        pool.send_ticket_key(second)
        for out in outputs:
            assert await wait_for_bytes(out, 2 * SIZE) == first + second
        assert pool.ticket_key == second  # what a restarted worker gets
    finally:
        await pool.stop(grace=1)


def failing_restarts(tasks: asyncio.TaskGroup, error: Exception, pools: list[WorkerPool],
                     failures: int) -> tuple[WorkerPool, list[int]]:
    """A pool of one worker that exits at once, whose restarts raise `error` `failures` times."""
    pool = WorkerPool(1, None, [], spawn=tasks.create_task)
    pool._argv = [sys.executable, "-c", "import time; time.sleep(30)"]
    starts = [0]
    real_spawn = pool._spawn

    async def spawn(slot: int) -> None:
        starts[0] += 1
        if starts[0] == 1:
            pool._argv = [sys.executable, "-c", "pass"]  # the first worker exits at once
            await real_spawn(slot)
            pool._argv = [sys.executable, "-c", "import time; time.sleep(30)"]
            return
        if starts[0] <= 1 + failures:
            raise error
        await real_spawn(slot)

    pool._spawn = spawn  # type: ignore[method-assign]
    pools.append(pool)
    return pool, starts


async def test_a_worker_that_cannot_be_started_is_tried_again() -> None:
    """A failed fork (OSError) is logged and retried after the pause, as Postfix's master does:
    the daemon keeps serving and the worker comes back."""
    pools: list[WorkerPool] = []
    try:
        async with asyncio.timeout(15), asyncio.TaskGroup() as tasks:
            pool, starts = failing_restarts(tasks, OSError("fork failed"), pools, failures=2)
            await pool.start()
            while starts[0] < 4:
                await asyncio.sleep(0.05)
            assert pool._procs[0].returncode is None  # the fourth start runs
            await pool.stop(grace=1)
    finally:
        for pool in pools:
            await pool.stop(grace=1)


async def test_a_watcher_that_fails_reaches_the_daemons_task_group() -> None:
    """The watchers run in the task group the daemon passes (`spawn`): a watcher that fails by a
    bug stops the daemon (systemd restarts it) instead of vanishing unrestarted."""
    pools: list[WorkerPool] = []
    try:
        async with asyncio.timeout(10):
            try:
                async with asyncio.TaskGroup() as tasks:
                    pool, starts = failing_restarts(tasks, RuntimeError("bug"), pools, failures=1)
                    await pool.start()
            except ExceptionGroup as group:
                assert group.subgroup(RuntimeError) is not None and starts[0] == 2
            else:
                raise AssertionError("the failed restart was lost")
    finally:
        for pool in pools:
            await pool.stop(grace=1)
