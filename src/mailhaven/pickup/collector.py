"""Pickup: moves locally submitted mail from the drop directory into the queue (Postfix's pickup).

In: complete files in `<state_dir>/maildrop/new/` (written by `mailhaven sendmail`, format in
`maildrop.py`). Out: queued messages, through the injected `Door` (spool writer + intake, the
only door into the queue), logged as `<QID>: uid=<uid> from=<sender>`.

Invariants:
- at-least-once: a drop file is deleted only after intake returned a queue id, i.e. after the
  queue commit. A crash between the two queues the message again at the next collect (a
  duplicate, never a loss).
- a file that is not a well-formed drop file, or that intake refuses, is moved to
  `maildrop/corrupt/` with a log line, and the rest of the directory is still collected;
- nothing here raises into the daemon: `collect()` logs unexpected errors and leaves the file
  for the next round; collects never overlap (one lock).
- the queue's arrival time is when the file reached `new/` (Postfix keeps the posting time), so
  `delay=` and the queue lifetime include a wait in the maildrop while the daemon was down;
- the body is streamed from the file in `CHUNK` pieces, in a worker thread (file I/O stays off
  the event loop); memory use does not grow with the message size.

When: `collect()` at start-up, on each poke (`wake()`, from the control channel), and from
`run()`, which also notices new files by polling the directory's mtime every `poll_interval`
seconds (users who cannot reach the 0600 control socket still get their mail picked up), and
collects again `RETRY_DEFERRED` seconds after a file was refused for now (4xx).

SECURITY: the drop file is written by an unprivileged local user, so everything in it is
untrusted (Postfix's pickup is the same trust boundary). Only sender, recipients and the DSN/
BODY options are taken from it, each syntax-checked; client name, address, HELO and AUTH
identity are never taken from it, so a local user cannot forge an authenticated or remote
origin in the trace header. The uid logged is the file's owner. See `maildrop.open_drop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, assert_never

from mailhaven.faults import crash_point
from mailhaven.intake.cleanup import Intake, Outcome, Queued, Refused
from mailhaven.pickup.dropfile import (
    NAME_PATTERN,
    STALE_TMP_AGE,
    CorruptDrop,
    DropDirs,
    fsync_directory,
    open_drop,
)
from mailhaven.proto.envelope import Envelope, RecipientSpec
from mailhaven.spool.message_writer import MessageWriter
from mailhaven.spool.store import Spool

log = logging.getLogger("mailhaven.pickup")

#: Bytes read from a drop file at a time.
CHUNK = 64 * 1024
#: RFC 5321 §4.5.3.1.3: a path is at most 256 octets (254 for the address itself).
MAX_ADDRESS = 256
#: Seconds before a file refused for now (4xx: spool full, a milter down) is tried again when
#: nothing else wakes the pickup (Postfix's pickup rescans the maildrop every 60 s).
RETRY_DEFERRED = 60.0
_NOTIFY = frozenset({"SUCCESS", "FAILURE", "DELAY", "NEVER"})
_BODY_TYPES = frozenset({"7BIT", "8BITMIME", "BINARYMIME"})


class BodyWriter(Protocol):
    """The spool's `MessageWriter`, as far as pickup uses it."""

    @property
    def queue_id(self) -> str: ...

    #: when the message arrived, if before its commit (the spool's clock otherwise)
    arrival: float | None

    def write(self, data: bytes) -> None: ...

    def abort(self) -> None: ...


class Door(Protocol):
    """The way into the queue: a new spool writer, then intake's submit."""

    def new_message(self) -> BodyWriter: ...

    async def submit(self, writer: BodyWriter, envelope: Envelope) -> Outcome: ...


def _address(value: Any, *, empty_ok: bool) -> str:
    if not isinstance(value, str) or len(value) > MAX_ADDRESS:
        raise CorruptDrop("bad address")
    if not value and not empty_ok:
        raise CorruptDrop("empty recipient")
    if any(ord(c) < 33 or c in "<>" or ord(c) == 127 for c in value):
        raise CorruptDrop("control character, space or bracket in an address")
    return value


def _optional_text(meta: dict[str, Any], key: str, limit: int = 100) -> str | None:
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        raise CorruptDrop(f"bad {key}")
    return value


def envelope_from_meta(meta: dict[str, Any], *, uid: int, eight_bit: bool) -> Envelope:
    """Validate the untrusted meta object of a drop file into an Envelope (CorruptDrop if not).

    `eight_bit`: the body has octets above 127; an undeclared body type then becomes 8BITMIME.
    """
    sender = _address(meta.get("sender"), empty_ok=True)
    raw = meta.get("recipients")
    if not isinstance(raw, list) or not raw:
        raise CorruptDrop("no recipients")
    recipients = []
    for item in raw:
        if not isinstance(item, dict):
            raise CorruptDrop("bad recipient")
        notify = item.get("notify") or []
        if not isinstance(notify, list) or not all(n in _NOTIFY for n in notify):
            raise CorruptDrop("bad NOTIFY")
        orcpt = item.get("orcpt")
        if orcpt is not None and not (
            isinstance(orcpt, list) and len(orcpt) == 2 and all(isinstance(x, str) for x in orcpt)
        ):
            raise CorruptDrop("bad ORCPT")
        recipients.append(
            RecipientSpec(
                _address(item.get("address"), empty_ok=False),
                tuple(notify),
                (orcpt[0], _address(orcpt[1], empty_ok=False)) if orcpt else None,
            )
        )
    body_type = meta.get("body_type")
    if body_type is None:
        body_type = "8BITMIME" if eight_bit else "7BIT"
    elif body_type not in _BODY_TYPES:
        raise CorruptDrop("bad body_type")
    ret = _optional_text(meta, "dsn_ret")
    if ret is not None and ret not in ("FULL", "HDRS"):
        raise CorruptDrop("bad dsn_ret")
    smtputf8 = meta.get("smtputf8", False)
    if not isinstance(smtputf8, bool):
        raise CorruptDrop("bad smtputf8")
    return Envelope(
        sender=sender,
        recipients=tuple(recipients),
        body_type=body_type,
        smtputf8=smtputf8 or not all(r.address.isascii() for r in recipients)
        or not sender.isascii(),
        dsn_ret=ret,
        dsn_envid=_optional_text(meta, "dsn_envid"),
        protocol="local",
        extra={"uid": str(uid), "origin": "pickup"},
    )


class Pickup:
    """Collects `maildrop/new/` into the queue. Built by the composition root."""

    def __init__(
        self,
        root: Path,
        door: Door,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.dirs = DropDirs(root)
        self._door = door
        self._clock = clock
        self._lock = asyncio.Lock()
        self._poke = asyncio.Event()
        self._seen_mtime: int | None = None
        #: when files refused for now are due again (None: there are none)
        self._retry_at: float | None = None

    def prepare(self) -> None:
        """Create the directories if missing (blocking, quick)."""
        self.dirs.create()

    def wake(self) -> None:
        """Ask `run()` to collect now (a poke from the control channel)."""
        self._poke.set()

    async def run(self, poll_interval: float = 5.0) -> None:
        """Collect at start, then whenever poked or the directory changed; until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), poll_interval)
            poked = self._poke.is_set()
            self._poke.clear()
            due = self._retry_at is not None and self._clock() >= self._retry_at
            if poked or self._changed() or due:
                await self.collect()

    def _changed(self) -> bool:
        try:
            mtime = os.stat(self.dirs.new).st_mtime_ns
        except OSError:
            return False
        changed = mtime != self._seen_mtime
        self._seen_mtime = mtime
        return changed

    async def collect(self) -> int:
        """Queue every complete drop file; returns how many were queued. Never raises
        (except cancellation)."""
        async with self._lock:
            self._retry_at = None
            try:
                names = sorted(await asyncio.to_thread(os.listdir, self.dirs.new))
            except FileNotFoundError:
                return 0
            except OSError as err:
                log.error("cannot list %s: %s", self.dirs.new, err)
                return 0
            queued = 0
            for name in names:
                try:
                    queued += await self._take(name)
                except Exception:
                    log.exception("%s: pickup failed; will retry", name)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self._remove_stale_tmp)
            return queued

    async def _take(self, name: str) -> int:
        path = self.dirs.new / name
        if name.startswith("."):
            return 0
        if not NAME_PATTERN.fullmatch(name):
            await asyncio.to_thread(self._quarantine, name, "not a drop file name")
            return 0
        writer = self._door.new_message()
        try:
            envelope = await asyncio.to_thread(self._read_into, path, writer)
        except CorruptDrop as err:
            writer.abort()
            await asyncio.to_thread(self._quarantine, name, str(err))
            return 0
        except FileNotFoundError:
            writer.abort()
            return 0
        except BaseException:
            writer.abort()
            raise
        crash_point("pickup_read")
        outcome = await self._door.submit(writer, envelope)
        match outcome:
            case Queued(queue_id=qid):
                log.info("%s: uid=%s from=<%s>", qid, envelope.extra["uid"], envelope.sender)
                crash_point("pickup_queued")
                await asyncio.to_thread(self._remove, path)
                return 1
            case Refused(reply=reply) if reply.code < 500:
                # e.g. 452 4.3.1, the spool is full: the drop file stays for the next round
                log.warning("%s: not collected now: %s", name, reply.one_line())
                if self._retry_at is None:
                    self._retry_at = self._clock() + RETRY_DEFERRED
                return 0
            case Refused(reply=reply):
                await asyncio.to_thread(
                    self._quarantine, name, f"refused: {reply.code} {reply.text}"
                )
                return 0
            case _:
                assert_never(outcome)

    def _read_into(self, path: Path, writer: BodyWriter) -> Envelope:
        drop = open_drop(path)
        try:
            left = drop.body_size
            eight_bit = False
            while left:
                chunk = drop.body.read(min(CHUNK, left))
                if not chunk:
                    raise CorruptDrop("truncated body")
                eight_bit = eight_bit or not chunk.isascii()
                writer.write(chunk)
                left -= len(chunk)
            if drop.body.read(1):
                raise CorruptDrop("data after the body")
        finally:
            drop.close()
        # Postfix keeps the posting time: `delay=` and the lifetime count from the maildrop.
        writer.arrival = drop.arrived
        return envelope_from_meta(drop.meta, uid=drop.uid, eight_bit=eight_bit)

    def _remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        fsync_directory(path.parent)

    def _quarantine(self, name: str, reason: str) -> None:
        self.dirs.corrupt.mkdir(mode=0o700, exist_ok=True)
        try:
            os.rename(self.dirs.new / name, self.dirs.corrupt / name)
        except FileNotFoundError:
            return
        log.warning("%s: moved to %s: %s", name, self.dirs.corrupt, reason)

    def _remove_stale_tmp(self) -> None:
        limit = self._clock() - STALE_TMP_AGE
        for entry in os.scandir(self.dirs.tmp):
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime < limit:
                    os.unlink(entry.path)
                    log.info("%s: removed stale temporary file", entry.name)


class IntakeDoor:
    """The production `Door`: the spool makes the writer, intake queues it."""

    def __init__(self, spool: Spool, intake: Intake) -> None:
        self._spool = spool
        self._intake = intake

    def new_message(self) -> BodyWriter:
        return self._spool.new_message()

    async def submit(self, writer: BodyWriter, envelope: Envelope) -> Outcome:
        assert isinstance(writer, MessageWriter)
        return await self._intake.submit(writer, envelope, tls=None)
