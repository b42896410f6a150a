"""Hold N idle SMTP connections open: a separate client process for the memory target.

    python bench/idle_client.py --port PORT --conns N --ready FILE

Why a separate process: the server's RSS is measured from /proc, and a client inside the
measuring process would compete for file descriptors and CPU with it. Why `selectors` and raw
non-blocking sockets instead of asyncio streams: 10,000 connections must cost the client
little and open quickly.

Each connection: connect, read the 220 banner, send EHLO, read the reply up to its last line
(`250 `). Opening is in waves of `--wave` connections so the listen backlog is never overrun.
Sources are 127.0.0.1, 127.0.0.2, ... with `--per-source` connections each (the ephemeral port
range is ~28,000 ports per source address). When all are idle it writes "READY <n> <seconds>"
to FILE, then waits for SIGTERM (or --hold seconds, a bound), sends QUIT on each and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import selectors
import signal
import socket
import sys
import time

IP_BIND_ADDRESS_NO_PORT = 24  # Linux: pick the source port at connect(), per 4-tuple


def open_wave(port: int, sources: list[str], first: int, n: int, per_source: int,
              timeout: float) -> list[socket.socket]:
    """Open `n` connections and bring each to the idle state (EHLO answered)."""
    sel = selectors.DefaultSelector()
    state: dict[socket.socket, bytes] = {}
    for i in range(first, first + n):
        s = socket.socket()
        s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        s.bind((sources[i // per_source], 0))
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        state[s] = b""
        sel.register(s, selectors.EVENT_READ)
    done: list[socket.socket] = []
    deadline = time.monotonic() + timeout
    while state and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1.0):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            data = state[s] + s.recv(4096)
            if not data:
                raise SystemExit("server closed a connection before it was idle")
            if data[:1] in (b"4", b"5"):
                raise SystemExit(f"server refused: {data[:200]!r}")
            if data.startswith(b"220") and b"\n220 " in b"\n" + data and data.endswith(b"\n"):
                s.send(b"EHLO idle.bench.test\r\n")
                data = b"EHLO-SENT"
            elif data.startswith(b"EHLO-SENT") and b"\n250 " in b"\n" + data[9:]:
                sel.unregister(s)
                del state[s]
                done.append(s)
                continue
            state[s] = data
    if state:
        raise SystemExit(f"{len(state)} connections not idle after {timeout:.0f}s")
    sel.close()
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--conns", type=int, required=True)
    ap.add_argument("--ready", required=True, help="file to write 'READY n seconds' into")
    ap.add_argument("--wave", type=int, default=200)
    ap.add_argument("--per-source", type=int, default=20000)
    ap.add_argument("--hold", type=float, default=300.0, help="exit after this many seconds")
    a = ap.parse_args()
    sources = [f"127.0.0.{1 + i}" for i in range(a.conns // a.per_source + 1)]
    stop = False

    def on_term(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.perf_counter()
    conns: list[socket.socket] = []
    try:
        for first in range(0, a.conns, a.wave):
            conns += open_wave(a.port, sources, first, min(a.wave, a.conns - first),
                               a.per_source, timeout=60.0)
    except OSError as exc:
        sys.exit(f"after {len(conns)} connections: {errno.errorcode.get(exc.errno or 0)} {exc}")
    with open(a.ready, "w") as f:
        f.write(f"READY {len(conns)} {time.perf_counter() - t0:.2f}\n")
    deadline = time.monotonic() + a.hold
    while not stop and time.monotonic() < deadline:
        time.sleep(0.1)
    for s in conns:
        with contextlib.suppress(OSError):
            s.send(b"QUIT\r\n")
        s.close()


if __name__ == "__main__":
    main()
