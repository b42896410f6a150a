"""Fakes and helpers shared across the test suite (fixtures built on them: tests/conftest.py).

A clock the tests move by hand, a free loopback port, the small records most spool and
scheduler tests need, and the messages of a Maildir. Fakes of *peers* do not belong here:
interoperability tests run the real programs (tests/support/).
"""

from __future__ import annotations

import mailbox
import socket
from pathlib import Path

from mailhaven.proto.envelope import Envelope, RecipientSpec
from mailhaven.spool import QueuedRecipient, Spool


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on `host` (the kernel's pick; tiny race, fine for tests)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Wake:
    """A wake-up callback that counts its calls."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def maildir_messages(path: Path) -> list[bytes]:
    """The messages of the Maildir at `path`, sorted by content; none if it does not exist."""
    if not path.exists():
        return []
    box = mailbox.Maildir(path, create=False)
    return sorted(box.get_bytes(k) for k in box.iterkeys())


def envelope(*rcpts: str, sender: str = "alice@example.org") -> Envelope:
    return Envelope(sender, tuple(RecipientSpec(r) for r in rcpts))


def queued(*rcpts: str) -> list[QueuedRecipient]:
    return [QueuedRecipient(r, r) for r in rcpts]


async def put(
    s: Spool, body: bytes, *rcpts: str, header: bytes = b"Received: test\r\n",
    sender: str = "alice@example.org",
) -> str:
    rcpts = rcpts or ("bob@example.net",)
    w = s.new_message()
    w.write(body)
    return await s.commit(w, envelope(*rcpts, sender=sender), queued(*rcpts), header)


class FailingCommit:
    """A spool checkpoint hook that makes every COMMIT fail (before it runs) while `armed`."""

    def __init__(self) -> None:
        self.armed = False

    def __call__(self, point: str) -> None:
        if self.armed and point == "before_commit":
            raise OSError("disk on fire")


def dkim_rsa_key() -> tuple[bytes, str]:
    """A fresh RSA-2048 signing key (PEM) and the DKIM TXT record that publishes it."""
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
