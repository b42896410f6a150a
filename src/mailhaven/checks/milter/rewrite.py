"""Apply the milters' end-of-message edits: a new copy of the message and a new envelope.

In: the message as received (a spool writer), the combined `MessageVerdict`. Out: a writer
with the same queue id holding the edited header section and the original or replacement body,
and the envelope with the changed sender and recipients. The original writers are aborted.

Invariants: the body is copied in bounded chunks, never read whole; a message without edits is
not copied at all; recipients are deleted before added ones are appended, each address once.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import BinaryIO, Protocol

from mailhaven.checks.milter.chain import MessageVerdict
from mailhaven.proto.envelope import Envelope, RecipientSpec
from mailhaven.proto.milter_edit import apply_edits

#: bytes copied per step
COPY_CHUNK = 1024 * 1024


class EditableWriter(Protocol):
    @property
    def queue_id(self) -> str: ...
    def write(self, data: bytes) -> None: ...
    def abort(self) -> None: ...
    @property
    def spilled(self) -> bool: ...
    def read_back(self) -> BinaryIO: ...


class Readable(Protocol):
    @property
    def spilled(self) -> bool: ...
    def read_back(self) -> BinaryIO: ...


def edit_envelope(envelope: Envelope, verdict: MessageVerdict) -> Envelope:
    sender = envelope.sender if verdict.sender is None else verdict.sender
    gone = {a.lower() for a in verdict.deleted}
    recipients = [r for r in envelope.recipients if r.address.lower() not in gone]
    have = {r.address.lower() for r in recipients}
    for address in verdict.added:
        if address.lower() not in have:
            have.add(address.lower())
            recipients.append(RecipientSpec(address))
    return dataclasses.replace(envelope, sender=sender, recipients=tuple(recipients))


async def rewrite(
    writer: EditableWriter,
    verdict: MessageVerdict,
    sibling: Callable[[], EditableWriter],
) -> EditableWriter:
    """The edited message in a new writer (or `writer` itself when nothing in it changes)."""
    if not verdict.header_edits and verdict.body is None:
        return writer
    header = verdict.header
    assert header is not None
    fresh = sibling()
    try:
        section = apply_edits(
            header,
            verdict.header_edits,
            leading_space=verdict.leading_space,
            trace_first=verdict.trace_first,
        )
        fresh.write(section + (header.separator or b"\r\n"))
        if verdict.body is not None:
            await _copy(verdict.body, 0, fresh)
        else:
            await _copy(writer, header.body_offset, fresh)
    except BaseException:
        fresh.abort()
        raise
    finally:
        if verdict.body is not None:
            verdict.body.abort()
    writer.abort()
    return fresh


async def _copy(source: Readable, offset: int, target: EditableWriter) -> None:
    """Copy `source` from `offset`: in memory at once, from a spilled file in a thread."""
    if not source.spilled:
        with source.read_back() as stream:
            stream.seek(offset)
            target.write(stream.read())
        return
    stream = await asyncio.to_thread(source.read_back)
    try:
        await asyncio.to_thread(stream.seek, offset)
        while chunk := await asyncio.to_thread(stream.read, COPY_CHUNK):
            target.write(chunk)
    finally:
        stream.close()
