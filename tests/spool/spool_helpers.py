"""Helpers shared by the spool and scheduler tests."""

from __future__ import annotations

from mailhaven.proto.envelope import Envelope, RecipientSpec
from mailhaven.spool import QueuedRecipient, Spool


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


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
