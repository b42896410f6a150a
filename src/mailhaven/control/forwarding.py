"""The control verbs with worker processes: one request, answered by every queue shard.

In: the daemon's own `QueueAdmin` and the control socket paths of its workers
(`runtime.workers`). Out: the same `Handlers` interface, each verb run on every shard and the
counts added up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any

from mailhaven.control.channel import SOCKET_NAME, ControlError, _ask_status, ask_all, request
from mailhaven.control.queue_admin import QueueAdmin, add_counts
from mailhaven.proto.replies import Reply, etrn_unable

log = logging.getLogger("mailhaven.control")


class Forwarding:
    """The daemon's `Handlers` with worker processes: each queue verb runs on the daemon's own
    shard and is passed on to every worker's control socket; the answer adds up the counts.

    A worker that does not answer (it is restarting) is logged and counts 0: the command line
    then reports fewer messages changed than asked, which is the truth. `pickup`, `etrn` and
    `release_domains` are the daemon's alone (its ETRN handler reaches the workers itself)."""

    def __init__(self, local: QueueAdmin, peers: Sequence[Path]) -> None:
        self.local = local
        self.peers = tuple(peers)

    async def _everywhere(self, request: dict[str, Any], mine: Awaitable[int]) -> int:
        return await mine + await ask_all(self.peers, request)

    async def flush(self, domain: str | None, ids: Sequence[str]) -> int:
        request: dict[str, Any] = {"cmd": "flush", "ids": list(ids)}
        if domain is not None:
            request["domain"] = domain
        return await self._everywhere(request, self.local.flush(domain, ids))

    async def hold(self, ids: Sequence[str]) -> int:
        return await self._everywhere({"cmd": "hold", "ids": list(ids)}, self.local.hold(ids))

    async def release(self, ids: Sequence[str]) -> int:
        request = {"cmd": "release", "ids": list(ids)}
        return await self._everywhere(request, self.local.release(ids))

    async def delete(self, ids: Sequence[str]) -> int:
        return await self._everywhere({"cmd": "delete", "ids": list(ids)}, self.local.delete(ids))

    async def requeue(self, ids: Sequence[str]) -> int:
        request = {"cmd": "requeue", "ids": list(ids)}
        return await self._everywhere(request, self.local.requeue(ids))

    async def pickup(self) -> int:
        return await self.local.pickup()

    async def etrn(self, client_ip: str, node: str) -> Reply:
        return await self.local.etrn(client_ip, node)

    async def release_domains(self, domains: Sequence[str]) -> int:
        return await self.local.release_domains(domains)

    async def status(self) -> dict[str, Any]:
        """The daemon's facts, its queue counts added to every worker's shard's."""
        facts = await self.local.status()
        answers = await asyncio.gather(
            *(asyncio.to_thread(_ask_status, path) for path in self.peers)
        )
        facts["workers"] = sum(1 for answer in answers if answer is not None)
        for answer in answers:
            if answer is not None:
                add_counts(facts["queue"], answer.get("queue"))
        return facts


async def forward_etrn(state_dir: Path, client_ip: str, argument: str) -> Reply:
    """A worker's ETRN: the daemon opens the release windows in every shard, so the worker
    asks it over the control socket and gives its client the daemon's reply."""
    path = state_dir / SOCKET_NAME
    obj = {"cmd": "etrn", "client": client_ip, "node": argument}
    try:
        answer = await asyncio.to_thread(request, path, obj, 10.0)
    except ControlError as err:
        answer = {"ok": False, "error": str(err)}
    if answer and answer.get("ok") and isinstance(answer.get("reply"), list):
        code, enhanced, text = answer["reply"]
        return Reply(int(code), str(text), enhanced)
    log.error("ETRN %s: the daemon did not answer: %s", argument, answer)
    return etrn_unable(argument)


async def release_in_workers(peers: Sequence[Path], domains: Sequence[str]) -> int:
    """Open ETRN release windows for `domains` in every worker's shard; the count released."""
    return await ask_all(peers, {"cmd": "release_domains", "domains": list(domains)})
