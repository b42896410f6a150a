"""A loopback TCP proxy that breaks the first LMTP session at a chosen point after DATA.

Between mailhaven's LMTP client and a real server (Dovecot). Connections after the first are
passed through untouched, so retries reach the server. On the first connection, once the
client has sent `DATA` and the whole message, the proxy either

- `"before-replies"`: keeps the end-of-data line back, calls `on_cut` (the test SIGKILLs
  Dovecot's lmtp process there: the server dies holding a message it never got the end of) and
  closes both sides, so the client sees the connection end with no per-recipient reply; or
- `"after-first-reply"`: forwards the end of data, passes the first reply line that follows to
  the client and then closes both sides: the later recipients' replies are lost.

Everything is on 127.0.0.1; every socket wait is bounded by `TIMEOUT`; threads are daemons and
`close()` ends them. Messages are small in tests: what follows DATA is held in memory until
the end-of-data line is seen.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

TIMEOUT = 30.0
END_OF_DATA = b"\r\n.\r\n"


class CuttingProxy:
    def __init__(self, target: tuple[str, int], mode: str,
                 on_cut: Callable[[], None] = lambda: None) -> None:
        if mode not in ("before-replies", "after-first-reply"):
            raise ValueError(mode)
        self.target, self.mode, self.on_cut = target, mode, on_cut
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.cut = threading.Event()  # set once the first session was broken
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> CuttingProxy:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in [self.listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> CuttingProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(self.target, timeout=TIMEOUT)
            client.settimeout(TIMEOUT)
            self._sockets += [client, server]
            self.connections += 1
            first = self.connections == 1
            state = _Session(first)
            for args in ((client, server, state, True), (server, client, state, False)):
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, state: _Session,
              upstream: bool) -> None:
        try:
            while not self._stop.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if not state.cutting:
                    dst.sendall(data)
                elif upstream:
                    if self._client_data(data, dst, state):
                        return
                elif self._server_data(data, dst, state):
                    return
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _client_data(self, data: bytes, server: socket.socket, state: _Session) -> bool:
        """Client -> server on the first session; True once the session is broken."""
        state.seen += data
        start = state.seen.upper().find(b"\r\nDATA\r\n")
        if start < 0:
            server.sendall(data)
            state.forwarded = len(state.seen)
            return False
        body_from = start + len(b"\r\nDATA\r\n")
        if state.forwarded < body_from:  # the DATA command itself goes through
            server.sendall(state.seen[state.forwarded:body_from])
            state.forwarded = body_from
        end = state.seen.find(END_OF_DATA, body_from - 2)
        if end < 0:
            return False  # hold the body until its end is seen
        if self.mode == "before-replies":
            server.sendall(state.seen[state.forwarded:end + 2])  # all but the lone "."
            self.on_cut()
            self.cut.set()
            return True
        state.data_sent = True  # before the send: the replies may come back at once
        server.sendall(state.seen[state.forwarded:])
        state.forwarded = len(state.seen)
        return False

    def _server_data(self, data: bytes, client: socket.socket, state: _Session) -> bool:
        """Server -> client on the first session: after the end of data, one line only."""
        if not state.data_sent:
            client.sendall(data)
            return False
        state.replies += data
        line_end = state.replies.find(b"\r\n")
        if line_end < 0:
            return False
        client.sendall(state.replies[:line_end + 2])
        self.cut.set()
        return True


class _Session:
    def __init__(self, cutting: bool) -> None:
        self.cutting = cutting
        self.seen = b""
        self.forwarded = 0
        self.data_sent = False
        self.replies = b""
