"""Acceptor processes: receiving on more than one core (`smtp_processes` > 1, default 1).

Why: one Python process is one core (the GIL), and receiving is most of the work at high
message rates. With `smtp_processes = N` the daemon (the first process) starts N - 1 acceptor
processes that serve the *same* listening sockets of the `smtp` listeners, inherited as file
descriptors: the kernel hands each new connection to whichever process accepts first, so an
idle acceptor takes the load off a busy daemon without any balancing logic of ours.

An acceptor only receives: smtpd -> intake -> spool, the same code and the same durability
promise (its `250` comes after its own SQLite commit; the processes take turns on a flock around
each write batch, each batch still a group commit). Everything stateful stays in the daemon: the scheduler and delivery,
recovery (an acceptor opens the spool only after the daemon recovered it, and never recovers
it), ETRN release windows (an acceptor forwards ETRN over the control socket), the pickup, the
control socket, submission and POP3.

How they talk:
- the doorbell: after a commit an acceptor sends one datagram to `<state_dir>/doorbell.sock`
  (at most one per event-loop iteration); the daemon's `Doorbell` wakes its scheduler. A ring
  lost to a full socket buffer costs nothing: the buffer is full of rings.
- the lifeline: each acceptor inherits the read end of a pipe whose write end only the daemon
  holds; end of file (the daemon exited, even by SIGKILL) makes the acceptor stop gracefully.
- signals: the daemon forwards SIGHUP (reload) and SIGTERM (stop) to its acceptors by PID and
  restarts one that dies unexpectedly, after `RESTART_PAUSE` seconds.

SECURITY: the doorbell socket is created with mode 0600 in the state directory; what arrives on
it is never parsed, only counted as "look at the queue". Acceptors run with the daemon's
privileges and configuration file.

Measured (docs/benchmarks.md): on a 2-core machine that also runs the load generator, a second
process brings no throughput gain; the option exists for machines with cores to spare.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("mailhaven.master")

DOORBELL_NAME = "doorbell.sock"
#: seconds before an acceptor that died is started again
RESTART_PAUSE = 1.0


@dataclass(frozen=True)
class AcceptorRole:
    """What makes a `mailhaven serve` an acceptor: the inherited listening sockets (file
    descriptors of the daemon's `smtp` listeners) and the lifeline's read end."""

    fds: tuple[int, ...]
    lifeline: int | None = None


class Doorbell:
    """The daemon's end: a datagram socket whose every arrival calls `ring` (once per batch)."""

    def __init__(self, path: Path, ring: Callable[[], None]) -> None:
        self.path = path
        self._ring = ring
        self._sock: socket.socket | None = None

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        sock.setblocking(False)
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._drain)

    def _drain(self) -> None:
        assert self._sock is not None
        rang = False
        while True:
            try:
                self._sock.recv(64)
            except (BlockingIOError, InterruptedError):
                break
            rang = True
        if rang:
            self._ring()

    def close(self) -> None:
        if self._sock is None:
            return
        asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class DoorbellClient:
    """An acceptor's end: `ring()` after each commit; coalesced to one datagram per loop turn."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._pending = False

    def ring(self) -> None:
        if not self._pending:
            self._pending = True
            asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        self._pending = False
        try:
            self._sock.sendto(b"!", self.path)
        except (BlockingIOError, InterruptedError):
            pass  # the daemon has rings waiting already
        except OSError as err:  # no daemon: the lifeline stops us soon
            log.warning("acceptor: doorbell %s: %s", self.path, err.strerror)

    def close(self) -> None:
        self._sock.close()


def watch_lifeline(fd: int, on_lost: Callable[[], None]) -> None:
    """Call `on_lost` once the daemon is gone (end of file on the inherited pipe)."""
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            data = os.read(fd, 64)
        except BlockingIOError:
            return
        if not data:
            loop.remove_reader(fd)
            log.warning("acceptor: the daemon is gone; stopping")
            on_lost()

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)


class AcceptorPool:
    """The daemon's acceptor processes: start, forward signals, restart, stop (by PID)."""

    def __init__(self, count: int, config_source: str | None, fds: Sequence[int]) -> None:
        self.count = count
        self._argv = [sys.executable, "-m", "mailhaven", "serve"]
        if config_source is not None:
            self._argv += ["-c", config_source]
        self._argv += ["--acceptor-fds", ",".join(str(fd) for fd in fds)]
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
            self._watchers.append(asyncio.ensure_future(self._watch(slot)))

    async def _spawn(self, slot: int) -> None:
        read_end, write_end = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv,
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
        log.info("acceptor %d started (pid %d)", slot + 1, proc.pid)

    async def _watch(self, slot: int) -> None:
        while True:
            code = await self._procs[slot].wait()
            if self._stopping:
                return
            log.error(
                "acceptor %d (pid %d) exited with status %s; restarting in %.0f s",
                slot + 1, self._procs[slot].pid, code, RESTART_PAUSE,
            )
            await asyncio.sleep(RESTART_PAUSE)
            if self._stopping:
                return
            await self._spawn(slot)

    def signal(self, sig: signal.Signals) -> None:
        for proc in self._procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def stop(self, grace: float) -> None:
        """SIGTERM each acceptor (they finish their transactions like the daemon), wait, and
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
