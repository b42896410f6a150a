"""Queue administration: the postsuper/postqueue verbs of the control channel, on one spool.

In: a validated request from `control.channel` (flush, hold, release, delete, requeue, pickup,
ETRN, status). Out: a count of what changed (or the SMTP reply for ETRN). The daemon wires it to
its spool and scheduler; the CLI uses it directly on the spool when no daemon runs (holding
`spool.lock.DaemonLock`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from mailhaven.control.channel import BadRequest
from mailhaven.proto.replies import Reply, etrn_unable


class AdminSpool(Protocol):
    """The spool's administration methods (`spool.store.Spool` has them)."""

    root: Path

    async def hold(self, queue_id: str) -> int: ...

    async def release(self, queue_id: str) -> int: ...

    async def delete(self, queue_id: str) -> bool: ...

    async def requeue(self, queue_id: str | None = None) -> int: ...

    async def release_domain(self, domain: str) -> int: ...

    async def counts(self) -> dict[str, int]: ...


def _nothing() -> None:
    return None


class QueueAdmin:
    """The standard `Handlers`: the postsuper/postqueue verbs on a spool, then a scheduler wake.

    Used by the daemon (wired to its spool, `Runner.revisit`/`forget_dead` and
    `Pickup.wake`/`collect`) and by the CLI when no daemon runs (no wake, no pickup). Counts
    are messages changed, except a flush of everything, which counts recipients made due.
    A flush of any kind also calls `forget_dead` (Postfix's flush_dead), so a destination that
    was down is tried at once rather than after the dead-destination timer.
    """

    def __init__(
        self,
        spool: AdminSpool,
        *,
        wake: Callable[[], None] = _nothing,
        pickup: Callable[[], Awaitable[int]] | None = None,
        etrn: Callable[[str, str], Awaitable[Reply]] | None = None,
        release_domains: Callable[[Sequence[str]], Awaitable[int]] | None = None,
        forget_dead: Callable[[], None] = _nothing,
        about: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.spool = spool
        self.wake = wake
        self.forget_dead = forget_dead
        self._about = about
        self._pickup = pickup
        self._etrn = etrn
        self._release_domains = release_domains

    async def flush(self, domain: str | None, ids: Sequence[str]) -> int:
        if ids:
            count = await self.requeue(ids)
        elif domain is not None:
            count = await self._flush_domain(domain)
        else:
            count = await self.spool.requeue(None)
        self.forget_dead()
        self.wake()
        return count

    async def _flush_domain(self, domain: str) -> int:
        """ETRN-like: release the domain's route hold, and make every message with an
        unfinished recipient there due now (its other recipients too: a whole-message requeue)."""
        import asyncio

        from mailhaven.spool.listing import list_queue

        domain = domain.lower().rstrip(".")

        def matching() -> list[str]:
            return [
                m.queue_id
                for m in list_queue(self.spool.root)
                if any(
                    r.status.unfinished and r.address.rpartition("@")[2].lower() == domain
                    for r in m.recipients
                )
            ]

        await self.spool.release_domain(domain)
        ids = await asyncio.to_thread(matching)
        return sum([1 for qid in ids if await self.spool.requeue(qid)])

    async def hold(self, ids: Sequence[str]) -> int:
        count = sum([1 for qid in ids if await self.spool.hold(qid)])
        self.wake()  # the scheduler gives back what it holds in memory, so the hold applies
        return count

    async def release(self, ids: Sequence[str]) -> int:
        count = sum([1 for qid in ids if await self.spool.release(qid)])
        self.wake()
        return count

    async def delete(self, ids: Sequence[str]) -> int:
        count = sum([1 for qid in ids if await self.spool.delete(qid)])
        self.wake()
        return count

    async def requeue(self, ids: Sequence[str]) -> int:
        count = sum([1 for qid in ids if await self.spool.requeue(qid)])
        self.wake()
        return count

    async def pickup(self) -> int:
        return 0 if self._pickup is None else await self._pickup()

    async def etrn(self, client_ip: str, node: str) -> Reply:
        if self._etrn is None:
            return etrn_unable(node)
        return await self._etrn(client_ip, node)

    async def release_domains(self, domains: Sequence[str]) -> int:
        if self._release_domains is None:
            raise BadRequest("release_domains: no part-time hosts here")
        return await self._release_domains(domains)


    async def status(self) -> dict[str, Any]:
        """What the process says of itself (`about`), with its shard's queue counts."""
        facts = dict(self._about()) if self._about is not None else {}
        facts["queue"] = await self.spool.counts()
        return facts


def add_counts(total: dict[str, int], more: Any) -> None:
    """Add one shard's queue counts (a worker's answer: checked, it is another process's)."""
    if isinstance(more, dict):
        for key, value in more.items():
            if isinstance(key, str) and isinstance(value, int):
                total[key] = total.get(key, 0) + value
