"""A helper process for the private-key operations, so they do not cost the event loop's core.

Why: an RSA-2048 signature is a sizeable part of what a relayed message costs the event loop
(docs/benchmarks.md, "Outbound DKIM signing cost"). A separate process, like OpenDKIM beside Postfix, runs it on another
core; the loop only moves a few hundred bytes each way. Since the `cryptography` package lets
go of the interpreter lock while OpenSSL signs, the default is a thread of the server process
instead (`outbound.SIGN_THREADS`), which needs no pipes; the helper remains for a
`cryptography` that holds the lock, and for keeping the keys' arithmetic out of the server.

Protocol (stdin/stdout pipes, in order, one answer per request): a request is a 4-octet
big-endian length, then a 2-octet key index and the data to sign; an answer is a 4-octet length,
then one status octet (0: the signature follows; 1: an error text follows). The helper is
`python -m mailhaven.signing.helper KEYFILE...`, started by `SigningHelper` on first use with
the key files it loaded itself; it exits when its stdin closes.

Failure: when the helper cannot be started, dies or answers an error, the pending and later
requests are signed in this process (`signer.sign_data`) and one warning is logged: a signature
is never lost to a helper problem, it only costs the loop again.

SECURITY: the helper reads the same key files as the server (same account); it is our own child,
started with our interpreter, and nothing but these frames crosses the pipes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import struct
import sys
from collections.abc import Sequence
from pathlib import Path

from mailhaven.signing.keys import SigningKey
from mailhaven.signing.signer import sign_data

log = logging.getLogger("mailhaven.dkim")

_LENGTH = struct.Struct(">I")
_INDEX = struct.Struct(">H")
#: Seconds the helper has to exit once its stdin is closed, before it is killed.
STOP_TIMEOUT = 5.0


class SigningHelper:
    """The parent's side; see the module docstring."""

    def __init__(self, keys: Sequence[SigningKey]) -> None:
        self._keys = list(keys)
        self._index = {id(k): i for i, k in enumerate(self._keys)}
        self._proc: asyncio.subprocess.Process | None = None
        self._pending: collections.deque[asyncio.Future[bytes]] = collections.deque()
        self._reader: asyncio.Task[None] | None = None
        self._starting: asyncio.Task[None] | None = None
        self._failed = False

    async def sign(self, key: SigningKey, data: bytes) -> bytes:
        index = self._index.get(id(key))
        if self._failed or index is None:
            return sign_data(key, data)
        if self._proc is None:
            if self._starting is None:
                self._starting = asyncio.ensure_future(self._start())
            await asyncio.shield(self._starting)
            if self._failed:
                return sign_data(key, data)
        assert self._proc is not None and self._proc.stdin is not None
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending.append(future)
        self._proc.stdin.write(_LENGTH.pack(len(data) + 2) + _INDEX.pack(index) + data)
        try:
            return await future
        except _HelperError:
            return sign_data(key, data)

    async def _start(self) -> None:
        paths = [str(k.path) for k in self._keys]
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mailhaven.signing.helper", *paths,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )
        except OSError as err:
            self._fail(f"cannot start the signing helper: {err}")
            return
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        out = self._proc.stdout
        try:
            while True:
                (length,) = _LENGTH.unpack(await out.readexactly(4))
                frame = await out.readexactly(length)
                future = self._pending.popleft()
                if frame[:1] == b"\x00":
                    if not future.done():
                        future.set_result(frame[1:])
                else:
                    log.warning("signing helper: %s", frame[1:].decode("utf-8", "replace"))
                    if not future.done():
                        future.set_exception(_HelperError())
        except (asyncio.IncompleteReadError, ConnectionError, IndexError):
            self._fail("the signing helper stopped; signing in the server process")

    def _fail(self, why: str) -> None:
        if not self._failed:
            log.warning("%s", why)
        self._failed = True
        while self._pending:
            future = self._pending.popleft()
            if not future.done():
                future.set_exception(_HelperError())

    async def close(self) -> None:
        proc, self._proc = self._proc, None
        self._failed = True
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if self._reader is not None:
            self._reader.cancel()


class _HelperError(Exception):
    """The helper could not sign this request (it is signed in the server process)."""


def _serve(paths: Sequence[str]) -> int:
    """The helper's side: answer requests from stdin until it closes."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    from mailhaven.signing.keys import SigningKey as Key

    keys = []
    for path in paths:
        private = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        assert isinstance(private, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey)
        keys.append(Key("", "", private, Path(path)))
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = inp.read(4)
        if len(head) < 4:
            return 0
        (length,) = _LENGTH.unpack(head)
        frame = inp.read(length)
        if len(frame) < length or length < 2:
            return 1
        (index,) = _INDEX.unpack(frame[:2])
        try:
            answer = b"\x00" + sign_data(keys[index], frame[2:])
        except Exception as err:  # reported to the parent, which then signs itself
            answer = b"\x01" + f"{type(err).__name__}: {err}".encode()
        out.write(_LENGTH.pack(len(answer)) + answer)
        out.flush()


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1:]))
