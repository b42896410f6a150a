"""A scriptable milter for tests: the filter side of the milter protocol, written separately
from `mailhaven.proto.milter` (plain `struct`, from libmilter's mfdef.h) so the two check each
other.

    with TestMilter(replies={"R": [reject()]}) as milter:   # every RCPT rejected
        ... point mailhaven at milter.spec ("inet:127.0.0.1:PORT") ...
    milter.commands   # [(b"O", data), (b"C", data), ...] as received, every connection

`replies` maps a command letter ("C" connect, "H" helo, "M" mail, "R" rcpt, "T" data, "L"
header, "N" eoh, "B" body chunk, "E" end of message) to the packets to send back; the default is
`continue` (none at all for stages negotiated as no-reply). Instead of packets, a value may be
CLOSE (close the connection), STALL (never answer), GARBAGE (send bytes that are no packet)
or a callable `(data) -> list[bytes] | str` for anything else. Like libmilter, once it answered
DATA, a header, EOH or a body chunk with accept/reject/tempfail/discard it answers none of that
message's later commands (they are still recorded) until the next transaction, unless it
negotiated away both MAIL and RCPT (libmilter's state table then lets it re-enter the message).

Runs in daemon threads (one per connection) on a 127.0.0.1 ephemeral port; `stop()` closes
every socket it opened and joins the threads, each wait bounded.

SECURITY: test code only; binds 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType

CLOSE = "close"
STALL = "stall"
GARBAGE = "garbage"
Script = Sequence[bytes] | str | Callable[[bytes], "Sequence[bytes] | str"]
#: commands that never get a reply
_SILENT = {b"D", b"A", b"Q", b"K"}
#: the message's commands; a reply in _LEAVES to one in _EARLY makes libmilter ignore the rest
_MESSAGE = {b"T", b"L", b"N", b"B", b"E"}
_EARLY = _MESSAGE - {b"E"}
_LEAVES = {b"a", b"r", b"t", b"d", b"y"}
_NO_ENVELOPE = 0x4 | 0x8  # SMFIP_NOMAIL | SMFIP_NORCPT
#: command letter -> SMFIP_NR_* bit
_NR = {b"C": 0x1000, b"H": 0x2000, b"M": 0x4000, b"R": 0x8000, b"T": 0x10000, b"U": 0x20000,
       b"N": 0x40000, b"B": 0x80000, b"L": 0x80}


def pkt(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + cmd + data


def cont() -> bytes:
    return pkt(b"c")


def accept() -> bytes:
    return pkt(b"a")


def reject() -> bytes:
    return pkt(b"r")


def tempfail() -> bytes:
    return pkt(b"t")


def discard() -> bytes:
    return pkt(b"d")


def replycode(text: str) -> bytes:
    return pkt(b"y", text.encode() + b"\0")


def add_header(name: str, value: str) -> bytes:
    return pkt(b"h", name.encode() + b"\0" + value.encode() + b"\0")


def insert_header(index: int, name: str, value: str) -> bytes:
    return pkt(b"i", struct.pack(">I", index) + name.encode() + b"\0" + value.encode() + b"\0")


def change_header(index: int, name: str, value: str) -> bytes:
    return pkt(b"m", struct.pack(">I", index) + name.encode() + b"\0" + value.encode() + b"\0")


def replace_body(data: bytes) -> bytes:
    return pkt(b"b", data)


def change_from(address: str) -> bytes:
    return pkt(b"e", f"<{address}>".encode() + b"\0")


def add_rcpt(address: str) -> bytes:
    return pkt(b"+", f"<{address}>".encode() + b"\0")


def del_rcpt(address: str) -> bytes:
    return pkt(b"-", f"<{address}>".encode() + b"\0")


def quarantine(reason: str) -> bytes:
    return pkt(b"q", reason.encode() + b"\0")


def progress() -> bytes:
    return pkt(b"p")


class TestMilter:
    __test__ = False  # not a pytest class

    def __init__(
        self,
        replies: Mapping[str, Script] | None = None,
        *,
        actions: int = 0x1FF,
        protocol: int = 0,
        version: int = 6,
    ) -> None:
        self.replies = dict(replies or {})
        self.actions, self.protocol, self.version = actions, protocol, version
        self.commands: list[tuple[bytes, bytes]] = []
        self.connections = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def spec(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def seen(self, letter: str) -> list[bytes]:
        with self._lock:
            return [data for cmd, data in self.commands if cmd == letter.encode()]

    def wait_seen(self, letter: str, count: int, timeout: float = 5.0) -> list[bytes]:
        """Wait (bounded) until `count` commands `letter` arrived: the client's
        last writes are flushed by its event loop, so they may still be in flight."""
        deadline = time.monotonic() + timeout
        while len(got := self.seen(letter)) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return got

    def start(self) -> TestMilter:
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> TestMilter:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                self._conns.append(conn)
                self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _read(self, conn: socket.socket, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            try:
                chunk = conn.recv(n - len(data))
            except OSError:
                return None
            if not chunk:
                return None
            data += chunk
        return data

    def _serve(self, conn: socket.socket) -> None:
        left = False  # the current message was decided early: ignore the rest of it
        with conn:
            while not self._stop.is_set():
                head = self._read(conn, 4)
                if head is None:
                    return
                (length,) = struct.unpack(">I", head)
                body = self._read(conn, length)
                if body is None:
                    return
                cmd, data = body[:1], body[1:]
                with self._lock:
                    self.commands.append((cmd, data))
                if cmd == b"O":
                    conn.sendall(pkt(b"O", struct.pack(">III", self.version, self.actions, self.protocol)))
                    continue
                if cmd in (b"C", b"M", b"R"):  # a new transaction (MAIL may be negotiated away)
                    left = False
                if cmd in _SILENT or self.protocol & _NR.get(cmd, 0) or (left and cmd in _MESSAGE):
                    if cmd == b"Q":
                        return
                    continue
                script = self.replies.get(cmd.decode(), [cont()])
                if callable(script):
                    script = script(data)
                if script == CLOSE:
                    return
                if script == STALL:
                    self._stop.wait(30)
                    return
                if script == GARBAGE:
                    conn.sendall(b"\xff\xff\xff\xffgarbage")
                    continue
                try:
                    for reply in script:
                        conn.sendall(reply)
                except OSError:
                    return
                if cmd in _EARLY and script and bytes(script[-1][4:5]) in _LEAVES:
                    # libmilter re-enters the message when MAIL and RCPT are both skipped
                    left = self.protocol & _NO_ENVELOPE != _NO_ENVELOPE
