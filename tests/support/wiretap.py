"""A recording TCP relay on loopback: see what two SMTP peers really say to each other.

`Wiretap(target_port)` listens on 127.0.0.1 (a free port, or `port`) and forwards each
connection to 127.0.0.1:`target_port`, recording every chunk it forwards as
`(connection number, "c" | "s", bytes)` in one list, in the order it forwarded them. One
thread with one selector moves all bytes, so the order is total: if the client's `RCPT TO`
chunk comes before the server's reply to `MAIL FROM` in `events`, the client sent it without
waiting for that reply, i.e. it pipelined (RFC 2920).

SECURITY: test code only; binds and connects to 127.0.0.1 only. The serving loop checks a stop
flag every `POLL` seconds; `stop()` joins the thread and closes every socket.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from types import TracebackType

POLL = 0.05
HOST = "127.0.0.1"

Event = tuple[int, str, bytes]


class Wiretap:
    def __init__(self, target_port: int, *, port: int = 0) -> None:
        self.target = (HOST, target_port)
        self._listener = socket.create_server((HOST, port))
        self.port = int(self._listener.getsockname()[1])
        self.events: list[Event] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="wiretap", daemon=True)
        self._sel = selectors.DefaultSelector()
        self._conns = 0

    def start(self) -> Wiretap:
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        for key in list(self._sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._sel.close()

    def __enter__(self) -> Wiretap:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def snapshot(self) -> list[Event]:
        with self._lock:
            return list(self.events)

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(POLL):
                if key.data is None:
                    self._accept()
                else:
                    self._forward(key.fileobj, *key.data)  # type: ignore[arg-type]

    def _accept(self) -> None:
        client, _ = self._listener.accept()
        try:
            server = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        self._conns += 1
        self._sel.register(client, selectors.EVENT_READ, (server, self._conns, "c"))
        self._sel.register(server, selectors.EVENT_READ, (client, self._conns, "s"))

    def _forward(self, source: socket.socket, dest: socket.socket, conn: int, side: str) -> None:
        if source.fileno() < 0:  # closed a moment ago, with its peer, in this select round
            return
        try:
            chunk = source.recv(65536)
        except OSError:
            chunk = b""
        if chunk:
            with self._lock:
                self.events.append((conn, side, chunk))
            try:
                dest.sendall(chunk)
                return
            except OSError:
                pass
        for sock in (source, dest):  # one side ended: end both
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)
            sock.close()


def pipelined(events: list[Event], conn: int) -> bool:
    """Did the client of connection `conn` send RCPT TO before the server answered MAIL FROM?"""
    mail_at = rcpt_at = None
    for i, (c, side, data) in enumerate(events):
        if c != conn or side != "c":
            continue
        if mail_at is None and b"MAIL FROM:" in data.upper():
            mail_at = i
        if rcpt_at is None and b"RCPT TO:" in data.upper():
            rcpt_at = i
    if mail_at is None or rcpt_at is None:
        raise AssertionError(f"connection {conn}: no MAIL FROM/RCPT TO seen")
    reply_at = next(
        (i for i, (c, side, _) in enumerate(events) if c == conn and side == "s" and i > mail_at),
        len(events),
    )
    return rcpt_at < reply_at
