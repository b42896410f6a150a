"""TLS session-ticket keys shared by every process of one mailhaven, as Postfix's tlsmgr(8) does.

Why: a server's TLS 1.2/1.3 session tickets are encrypted with a key in its `SSL_CTX`, and
OpenSSL makes a random one per context. With worker processes (`runtime.workers`) a client
that returns with a ticket and lands on another process than the one that issued it cannot
resume and pays a full handshake. The daemon therefore makes one key (`new_key`), installs it
in itself (`install`) and hands it to each worker over the worker's lifeline pipe; every server
context built after that (`apply`, called by `net.tls.build_server_context`) encrypts and
decrypts tickets with it, and `install` of a new key (rotation) re-keys the live ones.

Why ctypes: neither Python's `ssl` nor pyOpenSSL (whose contexts asyncio cannot use anyway)
has an API for `SSL_CTX_set_tlsext_ticket_keys`, which is a macro over
`SSL_CTX_ctrl(ctx, SSL_CTRL_SET_TLSEXT_TICKET_KEYS, 80, keys)`. We find `SSL_CTX_ctrl` through
the `_ssl` extension module itself (its own dependencies: the very libssl it is linked to) and
the `SSL_CTX *` as the first field after the object header of CPython's `PySSLContext`.

How it protects itself (the process must never crash nor a context be corrupted): only on
CPython, only when `_ssl` exports or links the symbols and the library's version number is the
one `ssl` reports; before a write, `SSL_CTX_get_options` on the pointer must equal
`ctx.options` (a wrong pointer does not pass that), and after it a read-back must return the
key written. On any failure one warning is logged, the mechanism is switched off for the
process, and contexts keep OpenSSL's own per-context keys: resumption then works only with
the process that issued the ticket, which is the behaviour without this module.

Rotation: OpenSSL's plain key API holds one key, so a rotation cannot keep the previous key for
decryption as tlsmgr does; tickets issued before a rotation then get a full handshake once.

SECURITY: the key decrypts every session resumed with it (RFC 8446 §C.4, RFC 5077 §5.5). It
lives in memory only: never in argv, the environment, a file or a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import ssl
import sys
import weakref
from collections.abc import Callable

log = logging.getLogger("mailhaven.tls")

#: `SSL_CTX_set_tlsext_ticket_keys`: 16 bytes key name + 32 HMAC secret + 32 AES-256 key
KEY_LENGTH = 80
#: seconds between the daemon's new keys: Postfix's tlsmgr rotates every
#: `smtpd_tls_session_cache_timeout` (default 3600 s) for forward secrecy of resumed sessions
ROTATION_INTERVAL = 3600.0
#: openssl/ssl.h: SSL_CTRL_GET_TLSEXT_TICKET_KEYS, SSL_CTRL_SET_TLSEXT_TICKET_KEYS
_GET_KEYS, _SET_KEYS = 58, 59


class TicketKeyError(Exception):
    """Ticket keys cannot be set on this Python/OpenSSL; the reason is the message."""


class _OpenSSL:
    """The two libssl functions we call, bound with their C signatures."""

    def __init__(self) -> None:
        if sys.implementation.name != "cpython":
            raise TicketKeyError(f"not CPython ({sys.implementation.name})")
        import _ssl

        try:
            lib = ctypes.CDLL(_ssl.__file__)
            self.ctrl = lib.SSL_CTX_ctrl
            self.get_options = lib.SSL_CTX_get_options
            version = lib.OpenSSL_version_num
        except (OSError, AttributeError) as err:  # statically linked, symbols hidden
            raise TicketKeyError(f"libssl functions not reachable: {err}") from None
        version.restype, version.argtypes = ctypes.c_ulong, []
        if version() != ssl.OPENSSL_VERSION_NUMBER:
            raise TicketKeyError(
                f"libssl {version():#x} is not the ssl module's {ssl.OPENSSL_VERSION_NUMBER:#x}"
            )
        self.ctrl.restype = ctypes.c_long
        self.ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        self.get_options.restype = ctypes.c_uint64
        self.get_options.argtypes = [ctypes.c_void_p]

    def context_pointer(self, ctx: ssl.SSLContext) -> int:
        """The `SSL_CTX *` of `ctx`, checked against what Python knows of it."""
        import _ssl

        if not isinstance(ctx, _ssl._SSLContext):
            raise TicketKeyError(f"not an ssl context: {type(ctx).__name__}")
        pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
        if not pointer:
            raise TicketKeyError("no SSL_CTX pointer in the context object")
        if self.get_options(pointer) != ctx.options:
            raise TicketKeyError("the context's layout is not the expected one")
        return pointer

    def set_keys(self, ctx: ssl.SSLContext, key: bytes) -> None:
        pointer = self.context_pointer(ctx)
        buffer = ctypes.create_string_buffer(key, KEY_LENGTH)
        if self.ctrl(pointer, _SET_KEYS, KEY_LENGTH, buffer) != 1:
            raise TicketKeyError("SSL_CTX_set_tlsext_ticket_keys failed")
        if self.get_keys(ctx) != key:
            raise TicketKeyError("the ticket key read back is not the one set")

    def get_keys(self, ctx: ssl.SSLContext) -> bytes:
        out = ctypes.create_string_buffer(KEY_LENGTH)
        if self.ctrl(self.context_pointer(ctx), _GET_KEYS, KEY_LENGTH, out) != 1:
            raise TicketKeyError("SSL_CTX_get_tlsext_ticket_keys failed")
        return out.raw


def new_key() -> bytes:
    """A fresh random ticket key (name, HMAC secret and AES key)."""
    return os.urandom(KEY_LENGTH)


class TicketKeys:
    """One process's ticket key and the server contexts that use it.

    `apply(ctx)` gives a context the current key (if any); `install(key)` makes `key` current
    and re-keys every live context. After the first failure everything is a no-op: contexts
    keep OpenSSL's own keys."""

    def __init__(self) -> None:
        self.key: bytes | None = None
        self.disabled: str | None = None  # why, once switched off
        self._openssl: _OpenSSL | None = None
        self._contexts: weakref.WeakSet[ssl.SSLContext] = weakref.WeakSet()

    def install(self, key: bytes) -> bool:
        """Use `key` from now on, in new and live contexts; False if shared keys are off."""
        if len(key) != KEY_LENGTH:
            raise ValueError(f"a ticket key is {KEY_LENGTH} bytes, not {len(key)}")
        self.key = key
        return all([self._set(ctx, key) for ctx in list(self._contexts)]) and not self.disabled

    def apply(self, ctx: ssl.SSLContext) -> bool:
        """Give `ctx` the current key (and any later one); False if it keeps its own."""
        with contextlib.suppress(TypeError):  # not weakly referable: `_set` refuses it
            self._contexts.add(ctx)
        return self.key is not None and self._set(ctx, self.key)

    def adopt(self, key: bytes | None, who: str) -> None:
        """A worker: use the daemon's `key`; without one (None: a daemon of an older version)
        this process's contexts keep keys of their own, which is logged."""
        if key is None:
            log.warning("%s: no TLS ticket key from the daemon; tickets are this process's own",
                        who)
            return
        self.install(key)

    def current(self, ctx: ssl.SSLContext) -> bytes | None:
        """The key `ctx` really uses (None: it cannot be read here); for tests and checks."""
        try:
            return self._binding().get_keys(ctx)
        except TicketKeyError:
            return None

    def _binding(self) -> _OpenSSL:
        if self._openssl is None:
            self._openssl = _OpenSSL()
        return self._openssl

    def _set(self, ctx: ssl.SSLContext, key: bytes) -> bool:
        if self.disabled is not None:
            return False
        try:
            self._binding().set_keys(ctx, key)
        except (TicketKeyError, ctypes.ArgumentError, ValueError, TypeError) as err:
            self.disabled = str(err)
            self._contexts.clear()
            log.warning(
                "TLS session tickets: cannot share ticket keys between processes (%s); each "
                "process uses its own, so a client resumes only with the one it met before", err
            )
            return False
        return True


async def rotate(
    keys: TicketKeys, send: Callable[[bytes], object], interval: float = ROTATION_INTERVAL
) -> None:
    """The daemon: a new key every `interval` seconds, as Postfix's tlsmgr does, installed
    here and handed to `send` (the workers' lifelines). Runs until cancelled."""
    while True:
        await asyncio.sleep(interval)
        key = new_key()
        keys.install(key)
        send(key)


#: this process's ticket keys (the daemon installs a new key, a worker the daemon's)
process_keys = TicketKeys()
