"""Worker processes: the whole engine on more than one core (`smtp_processes` > 1, default 1).

Why: one Python process is one core (the GIL). With `smtp_processes = N` the daemon (shard 0)
starts N - 1 worker processes. Each worker runs the whole engine (smtpd -> intake -> spool ->
scheduler -> delivery -> bounce) on a queue shard of its own (`spool.shards`), and serves the
*same* listening sockets of the `smtp` listeners, inherited as file descriptors: the kernel
hands each new connection to whichever process accepts first, so an idle worker takes the load
off a busy daemon without any balancing logic of ours. The processes share nothing they write:
each commits to its own SQLite file (its `250` still comes after its own group commit), so none
waits for another's lock or fsync.

What stays in the daemon: submission and POP3 listeners, the pickup (`sendmail`), adoption of
orphan shards at start-up, and the control socket the command line talks to. The daemon passes
queue commands on to each worker's control socket (`control-<k>.sock`) and adds up the counts;
an ETRN a worker receives goes to the daemon, which opens the release window in every shard.
Queue limits (`queue.concurrency`, `queue.destination_concurrency`) are divided among the
processes, so a remote host still sees at most the configured number of connections.

How they live:
- the lifeline: each worker inherits the read end of a pipe whose write end only the daemon
  holds; end of file (the daemon exited, even by SIGKILL) makes the worker stop gracefully.
  The same pipe carries the daemon's TLS session-ticket keys (`net.tls_tickets`), fixed-size
  messages: the current one is in the pipe before the worker starts (`take_message`), later
  ones (rotation) arrive while it runs. So every process accepts every process's tickets,
  and the key is never in argv, the environment or a file.
- signals: the daemon forwards SIGHUP (reload) and SIGTERM (stop) to its workers by PID and
  restarts one that dies unexpectedly, after `RESTART_PAUSE` seconds; the new one recovers
  its shard like the daemon recovers its own.

SECURITY: workers run with the daemon's privileges and configuration file; their control
sockets are made like the daemon's (mode 0600, peer credentials checked).

What it buys on a 2-core machine: docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("mailhaven.master")

#: seconds before a worker that died is started again
RESTART_PAUSE = 1.0


@dataclass(frozen=True)
class WorkerRole:
    """What makes a `mailhaven serve` a worker: its shard number (1 and up), the inherited
    listening sockets (file descriptors of the daemon's `smtp` listeners) and the lifeline's
    read end."""

    shard: int
    fds: tuple[int, ...]
    lifeline: int | None = None


def control_socket(state_dir: Path, shard: int) -> Path:
    """Where shard `shard`'s engine listens for the daemon (0: the daemon's own socket)."""
    return state_dir / ("control.sock" if shard == 0 else f"control-{shard}.sock")


def take_message(fd: int, size: int) -> bytes | None:
    """The daemon's message of `size` bytes written to the lifeline before this worker started
    (None: there is none, e.g. a daemon of an older version). Writes of at most PIPE_BUF bytes
    are atomic (POSIX), so a message is there whole or not at all."""
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, size)
    except BlockingIOError:
        return None
    return data if len(data) == size else None


def watch_lifeline(
    fd: int,
    on_lost: Callable[[], None],
    on_message: Callable[[bytes], object] | None = None,
    size: int = 0,
) -> None:
    """Call `on_lost` once the daemon is gone (end of file on the inherited pipe), and
    `on_message` with each message of `size` bytes the daemon writes meanwhile."""
    loop = asyncio.get_running_loop()
    pending = bytearray()

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        if not data:
            loop.remove_reader(fd)
            log.warning("worker: the daemon is gone; stopping")
            on_lost()
            return
        if on_message is None or size <= 0:
            return
        pending.extend(data)
        while len(pending) >= size:
            message = bytes(pending[:size])
            del pending[:size]
            on_message(message)

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)


class WorkerPool:
    """The daemon's worker processes: start, forward signals, restart, stop (by PID)."""

    def __init__(
        self,
        count: int,
        config_source: str | None,
        fds: Sequence[int],
        ticket_key: bytes | None = None,
        spawn: Callable[[Coroutine[None, None, None]], asyncio.Task[None]] = asyncio.create_task,
    ) -> None:
        self.count = count
        #: starts the watcher tasks: the daemon's is its TaskGroup's, so a watcher that fails
        #: by a bug stops the daemon instead of vanishing (a failed fork is retried)
        self._spawn_task = spawn
        #: the TLS session-ticket key each worker gets on its lifeline (`net.tls_tickets`)
        self.ticket_key = ticket_key
        self._argv = [sys.executable, "-m", "mailhaven", "serve"]
        if config_source is not None:
            self._argv += ["-c", config_source]
        self._argv += ["--worker-fds", ",".join(str(fd) for fd in fds)]
        self._fds = tuple(fds)
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._lifelines: dict[int, int] = {}
        self._watchers: list[asyncio.Task[None]] = []
        self._stopping = False

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs.values()]

    async def start(self) -> None:
        for slot in range(self.count):
            await self._spawn(slot)
            self._watchers.append(self._spawn_task(self._watch(slot)))

    async def _spawn(self, slot: int) -> None:
        read_end, write_end = os.pipe()
        try:
            if self.ticket_key is not None:  # in the pipe before the worker looks (take_message)
                os.write(write_end, self.ticket_key)
            # a worker that never reads must not block the daemon (`send_ticket_key`)
            os.set_blocking(write_end, False)
            proc = await asyncio.create_subprocess_exec(
                *self._argv,
                "--shard",
                str(slot + 1),
                "--lifeline",
                str(read_end),
                pass_fds=(*self._fds, read_end),
                stdin=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        old = self._lifelines.pop(slot, None)
        if old is not None:
            os.close(old)
        self._lifelines[slot] = write_end
        self._procs[slot] = proc
        log.info("worker %d started (pid %d)", slot + 1, proc.pid)

    async def _watch(self, slot: int) -> None:
        while True:
            code = await self._procs[slot].wait()
            if self._stopping:
                return
            log.error(
                "worker %d (pid %d) exited with status %s; restarting in %.0f s",
                slot + 1, self._procs[slot].pid, code, RESTART_PAUSE,
            )
            while True:
                await asyncio.sleep(RESTART_PAUSE)
                if self._stopping:
                    return
                try:
                    await self._spawn(slot)
                    break
                except OSError as err:  # no fork, no pipe: try again, as Postfix's master does
                    log.error(
                        "worker %d could not be started: %s; trying again in %.0f s",
                        slot + 1, err, RESTART_PAUSE,
                    )

    def send_ticket_key(self, key: bytes) -> None:
        """Rotation: every running worker uses `key` from now on, and so will restarted ones."""
        self.ticket_key = key
        for slot, fd in self._lifelines.items():
            if self._procs[slot].returncode is not None:
                continue  # gone: its restart takes the key along
            try:
                os.write(fd, key)
            except OSError as err:  # a full pipe (a stuck worker) or one already gone
                log.warning("worker %d: TLS ticket key not sent: %s", slot + 1, err)

    def signal(self, sig: signal.Signals) -> None:
        for proc in self._procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def stop(self, grace: float) -> None:
        """SIGTERM each worker (they finish their transactions like the daemon), wait, and
        SIGKILL whoever is still there after `grace` + 5 seconds."""
        self._stopping = True
        self.signal(signal.SIGTERM)
        waits = [p.wait() for p in self._procs.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), grace + 5.0)
        except TimeoutError:
            self.signal(signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in self._procs.values()))
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        for fd in self._lifelines.values():
            os.close(fd)
        self._lifelines.clear()
