"""Message bytes on their way into the spool (`MessageWriter`) and back out (`open_stored`).

In: the receiver writes the body chunk by chunk. Up to the spool's inline limit the bytes stay
in memory (they will be stored as a BLOB in the same SQLite transaction as the envelope); past
it, everything spills to a temporary file under `tmp/` and later chunks go straight to that
file. So a writer never holds more than `inline_limit` bytes, whatever the message size.

Out: a stored message is the trace header (kept in the database) followed by the body (a BLOB or
`bodies/<qid>`); `open_stored` gives one fresh read stream over both without copying the file.

Writes to a spilled body happen on one background thread (`_WRITER`), in order: the page-cache
copy and the kernel's dirty-page throttling then overlap with the event loop's parsing of the
next chunk instead of stalling it (docs/benchmarks.md). At most `MAX_IN_FLIGHT` bytes per message wait for that thread; past it `write`
waits for the oldest, so memory stays bounded when the disk is slower than the network. A write
error (a full disk) is kept, later chunks are dropped and the file is removed at once; the
commit (`take_inline`/`seal_to`) raises it, so a message whose bytes did not reach the file is
never committed, and the session logs it once instead of once per chunk.

Durability steps for a spilled body (run off the event loop by the spool): flush, fsync the file,
rename it into `bodies/`, fsync the directory. Only then may the database row that points at it
be committed; recovery deletes any `tmp/` file and any `bodies/` file without a row.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import io
import os
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Protocol, cast

#: the buffer size for writes to a spilled body file
_FILE_BUFFER = 64 * 1024
#: bytes of one message that may wait for the writer thread
MAX_IN_FLIGHT = 4 * 1024 * 1024
#: the one thread that writes spilled bodies (FIFO: a message's chunks stay in order)
_WRITER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-body")


def fsync_directory(path: Path) -> None:
    """Make a rename or unlink inside `path` durable (POSIX needs the directory fsync'd)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MessageWriter:
    """Collects one message body. Get one from `Spool.new_message()`; commit or `abort()` it.

    The queue id is assigned at creation so the caller can log it and put it in the trace header
    before the commit. Usable as a context manager: leaving the block by an exception aborts.
    """

    def __init__(self, queue_id: str, tmp_dir: Path, inline_limit: int) -> None:
        self.queue_id = queue_id
        #: when the message arrived, if before its commit (pickup: the maildrop's time)
        self.arrival: float | None = None
        self._tmp_dir = tmp_dir
        self._inline_limit = inline_limit
        self._buffer = bytearray()
        self._file: BinaryIO | None = None
        self._path: Path | None = None
        self._size = 0
        self._closed = False
        self._in_flight: collections.deque[tuple[concurrent.futures.Future[int], int]] = (
            collections.deque()
        )
        self._in_flight_bytes = 0
        #: the first write error (a full disk): later chunks are dropped, the commit raises it
        self.error: OSError | None = None
        #: CRC-32 of a spilled body, computed as it streams in (checked before delivery)
        self.crc = 0
        #: set by the SMTP receiver once its framing (which refuses bare CRs) accepted the
        #: whole body: a local copy can then skip its own search for one
        self.no_bare_cr = False

    # -- the receiver's side ---------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self._closed:
            raise ValueError(f"{self.queue_id}: write to a closed message")
        if not data:
            return
        self._size += len(data)
        if self.error is not None:
            return  # the body is lost already; read the client's data to its end, once
        if self._file is None and len(self._buffer) + len(data) <= self._inline_limit:
            self._buffer += data
            return
        try:
            if self._file is None:
                self._spill()
            assert self._file is not None
            self.crc = zlib.crc32(data, self.crc)
            self._in_flight.append((_WRITER.submit(self._file.write, data), len(data)))
            self._in_flight_bytes += len(data)
            self._reap(MAX_IN_FLIGHT)
        except OSError as exc:
            # Not raised here: the session would log every later chunk's failure. The file
            # goes now (giving its space back); the commit raises this error.
            self.error = exc
            self._drop_file()

    def append_trailer(self, data: bytes) -> None:
        """Write `data` after the body (spool use, before `seal_to`, blocking): the envelope
        record `salvage` reads back; not part of the body, its size or its checksum."""
        self.check()
        assert self._file is not None and not self._closed
        self._reap(0)
        self._file.write(data)

    def check(self) -> None:
        """Raise the write error, if any (before anything of this message is committed)."""
        if self.error is not None:
            raise self.error

    def _reap(self, allowed: int) -> None:
        """Collect finished writes (raising the first error); wait while more than `allowed`
        bytes are outstanding (`allowed=0`: wait for all)."""
        while self._in_flight:
            future, size = self._in_flight[0]
            if self._in_flight_bytes <= allowed and not future.done():
                return
            self._in_flight.popleft()
            self._in_flight_bytes -= size
            future.result()

    @property
    def size(self) -> int:
        return self._size

    @property
    def spilled(self) -> bool:
        """True once the body lives in a file (it exceeded the inline limit)."""
        return self._path is not None

    @property
    def buffered(self) -> int:
        """Bytes held in memory by this writer (never more than the inline limit)."""
        return len(self._buffer)

    def head(self, limit: int) -> bytes:
        """The first `limit` bytes written so far, for cheap header inspection (Received:
        counting, Message-ID) without reading the whole body."""
        if self._file is None:
            return bytes(self._buffer[:limit])
        assert self._path is not None
        self._reap(0)
        self._file.flush()
        with open(self._path, "rb") as f:
            return f.read(limit)

    def abort(self) -> None:
        """Discard the message: nothing of it will ever be queued. Idempotent."""
        self._closed = True
        self._buffer = bytearray()
        self._drop_file()

    def _drop_file(self) -> None:
        if self._file is not None:
            with contextlib.suppress(Exception):  # the file is discarded either way
                self._reap(0)
            with contextlib.suppress(OSError):  # closing flushes: may fail on a full disk
                self._file.close()
            self._file = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None

    def sibling(self) -> MessageWriter:
        """A new, empty writer for the same queue id: a milter's edited copy of this message
        is written there (the queue id was already shown to the client and the milters)."""
        return MessageWriter(self.queue_id, self._tmp_dir, self._inline_limit)

    def read_back(self) -> BinaryIO:
        """A read stream over what was written so far (a milter is shown the message, and an
        edited copy is made from it); blocking reads when the body was spilled."""
        self.check()
        if self._file is None:
            return io.BytesIO(bytes(self._buffer))
        assert self._path is not None
        self._reap(0)
        self._file.flush()
        return open(self._path, "rb")

    def __enter__(self) -> MessageWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()

    # -- the spool's side ------------------------------------------------------------------
    def _spill(self) -> None:
        fd, name = tempfile.mkstemp(prefix=f"{self.queue_id}.", dir=self._tmp_dir)
        self._path = Path(name)
        self._file = open(fd, "wb", buffering=_FILE_BUFFER)  # noqa: SIM115 - closed by seal/abort
        self.crc = zlib.crc32(self._buffer)
        self._file.write(self._buffer)
        self._buffer = bytearray()  # release the memory, not just the length

    def take_inline(self) -> bytes:
        """Close the writer and hand over the in-memory body (spool use; not spilled only)."""
        assert self._file is None and not self._closed
        self.check()
        self._closed = True
        data = bytes(self._buffer)
        self._buffer = bytearray()
        return data

    def seal_to(self, target: Path, checkpoint: Callable[[str], None]) -> None:
        """Make the spilled body durable as `target` (blocking: run it in a thread).

        `checkpoint` is the spool's crash-injection hook, called before the fsync and after
        each durable step.
        """
        self.check()
        assert self._file is not None and self._path is not None and not self._closed
        self._closed = True
        self._reap(0)
        self._file.flush()
        checkpoint("body_written")
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        checkpoint("body_synced")
        os.rename(self._path, target)
        self._path = None
        fsync_directory(target.parent)
        checkpoint("body_linked")


class _Tail(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...

    def close(self) -> None: ...


class _Concat(io.RawIOBase):
    """A read-only raw stream over a bytes prefix followed by a file (closed with the stream
    when `own`, else left open for the next reader)."""

    def __init__(
        self, prefix: bytes, tail: _Tail | None, limit: int | None = None, *, own: bool = True
    ) -> None:
        self._prefix = memoryview(prefix)
        self._pos = 0
        self._tail = tail
        #: bytes of the tail still to give (None: to its end); what follows is a trailer
        self._left = limit
        self._own = own

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self._pos < len(self._prefix):
            n = min(len(buffer), len(self._prefix) - self._pos)
            buffer[:n] = self._prefix[self._pos : self._pos + n]
            self._pos += n
            return n
        if self._tail is None:
            return 0
        if self._left is None:
            return self._tail.readinto(buffer) or 0
        if self._left <= 0:
            return 0
        n = self._tail.readinto(memoryview(buffer)[: min(len(buffer), self._left)]) or 0
        self._left -= n
        return n

    def close(self) -> None:
        if self._tail is not None and self._own:
            self._tail.close()
        self._tail = None
        super().close()


def body_matches(path: Path, size: int, crc: int) -> bool:
    """Whether the body file still holds what was committed (size and CRC-32; blocking): a
    file damaged in place, even to the same size, must not be sent."""
    value = 0
    length = 0
    with open(path, "rb", buffering=0) as f:
        while length < size and (chunk := f.read(min(_FILE_BUFFER * 4, size - length))):
            value = zlib.crc32(chunk, value)
            length += len(chunk)
    return length == size and value == crc


def prefixed(header: bytes, body: BinaryIO) -> BinaryIO:
    """`header`, then `body` from its start: one copy of a message being delivered, read by
    one reader at a time. Closing it leaves `body` open for the next copy."""
    body.seek(0)
    raw = _Concat(header, cast(_Tail, body), own=False)
    return io.BufferedReader(raw, buffer_size=_FILE_BUFFER)


def open_stored(
    header: bytes, inline_body: bytes | None, body_path: Path | None, body_size: int | None = None
) -> BinaryIO:
    """A fresh binary stream over a stored message: trace header, then the body (the first
    `body_size` bytes of the file: an envelope trailer may follow)."""
    if body_path is None:
        return io.BytesIO(header + (inline_body or b""))
    tail = open(body_path, "rb", buffering=0)  # noqa: SIM115 - owned by the returned stream
    return io.BufferedReader(_Concat(header, tail, body_size), buffer_size=_FILE_BUFFER)
