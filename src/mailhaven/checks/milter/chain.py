"""All milters of one SMTP session: one verdict per stage, and the edits at end of message.

In: the session's stages (`start` at connect, `helo`, `mail`, `rcpt`, `end_of_message`,
`abort`, `close`) with the facts milters see as macros. Out: None (go on) or a `Reply` per
stage; at end of message a `MessageVerdict` with the refusal, discard/quarantine flags, the
header edits, the envelope edits and a replacement body already on disk.

Choices (where Postfix and Sendmail differ or the protocol leaves room):
- One connection per milter per SMTP session, opened in the background at connect so the
  client's greeting and EHLO do not wait for it; reused across transactions (SMFIC_ABORT ends
  a transaction that did not reach end of message).
- The milters of a list are asked concurrently at each stage; verdicts and edits are then
  taken in list order (the first refusal wins; edits apply in list order). Each milter sees the
  message as the client sent it.
- Each stage sends its own macros, as Postfix's milter_*_macros: the client's at CONNECT,
  TLS at HELO, the sender's and AUTH at MAIL, the recipient's at RCPT, and the queue id `i`
  from MAIL on. Milters keep what they were given (libmilter's smfi_getsymval looks through
  every stage), so repeating the connection's macros at every stage only cost bytes and
  parsing on both sides.
- The DATA stage is sent with the content at end of message (one round trip less for milters
  that want it; a refusal there refuses the message).
- Content is pipelined: DATA, headers, end of headers, body chunks and end of message are
  written without waiting for each `continue`; replies are read afterwards in order. A body
  chunk answered with SMFIR_SKIP stops the body.
- A milter that fails (refused, closed, garbage, timeout, an edit it did not negotiate, a body
  replacement past the message size limit) is dropped for the rest of the session and
  `default_action` applies at this stage and every later one: tempfail (`451 4.7.1`), accept
  (as if it were not configured) or reject (`550 5.7.1`), as Postfix's milter_default_action.
- A connect or HELO refusal refuses every later MAIL of the session (Postfix does the same).

SECURITY: a milter's replies are judged by `proto.milter`; its header edits by
`proto.milter_edit`. No milter can make a stage wait past its timeout or grow memory past the
message size limit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol, TypeVar

from mailhaven.checks.milter import pool
from mailhaven.checks.milter.client import MilterClient, MilterDown
from mailhaven.checks.milter.settings import MilterSettings
from mailhaven.proto import milter as m
from mailhaven.proto import milter_events as ev
from mailhaven.proto.milter_edit import (
    MAX_HEADER_SECTION,
    Header,
    HeaderEdit,
    HeaderField,
    split_header,
)
from mailhaven.proto.replies import (
    MILTER_CONN_FAILED,
    MILTER_REJECTED,
    MILTER_TEMPFAILED,
    Reply,
)
from mailhaven.proto.sansio import Wait

log = logging.getLogger("mailhaven.milter")
_T = TypeVar("_T")

#: Postfix's texts for a milter's reject/tempfail without SMFIR_REPLYCODE.


class BodySink(Protocol):
    """A spool writer for a replacement body."""

    def write(self, data: bytes) -> None: ...
    def abort(self) -> None: ...
    @property
    def spilled(self) -> bool: ...
    def read_back(self) -> BinaryIO: ...


class MessageSource(Protocol):
    """The message as it was received (a spool writer)."""

    @property
    def queue_id(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def spilled(self) -> bool: ...
    def read_back(self) -> BinaryIO: ...


async def off_loop(source: MessageSource, call: Callable[[], _T]) -> _T:
    """File reads of a spilled body run in a thread; an in-memory one is read at once (a
    thread hop costs more than the copy)."""
    if source.spilled:
        return await asyncio.to_thread(call)
    return call()


@dataclass(slots=True)
class MessageVerdict:
    refusal: Reply | None = None
    discard: bool = False
    quarantine: str | None = None
    header_edits: list[HeaderEdit] = field(default_factory=list)
    sender: str | None = None
    added: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    #: the replacement body (a writer holding it), if a milter replaced it
    body: BodySink | None = None
    #: the original header section, when edits need it
    header: Header | None = None
    leading_space: bool = False
    #: milters saw our Received: field first (see `proto.milter_edit.apply_edits`)
    trace_first: bool = False
    #: for the log: "<milter>: <what it did>" per milter that did something
    notes: list[str] = field(default_factory=list)

    @property
    def edited(self) -> bool:
        return bool(
            self.header_edits or self.body is not None or self.sender is not None
            or self.added or self.deleted
        )


@dataclass(slots=True)
class _State:
    client: MilterClient
    #: the milter accepted the whole session (at connect/HELO): not asked again
    session_done: bool = False
    #: the milter accepted the message: not asked again until the next MAIL
    message_done: bool = False
    in_message: bool = False


class MilterChain:
    def __init__(self, settings: MilterSettings) -> None:
        self.settings = settings
        self._states = [_State(MilterClient(e, settings.max_body)) for e in settings.endpoints]
        self._opening: asyncio.Future[None] | None = None
        #: a connect/HELO refusal: every MAIL of the session gets it
        self.session_refusal: Reply | None = None
        self.session_discard = False
        #: every macro value given so far (connect, HELO, the current transaction)
        self.macros: dict[str, str] = {}
        #: the transaction's macros repeated at RCPT and in the content stages (the queue id)
        self._txn: dict[str, str] = {}
        #: a milter said discard during this transaction
        self.discard = False

    # ------------------------------------------------------------------ stages

    def start(self, hostname: str, address: str, port: int, macros: Mapping[str, str]) -> None:
        """Open every milter and send CONNECT, in the background."""
        self.macros.update(macros)
        self._opening = asyncio.ensure_future(self._open(hostname, address, port, dict(macros)))

    async def _open(
        self, hostname: str, address: str, port: int, connect_macros: dict[str, str]
    ) -> None:
        async def one(state: _State) -> ev.Verdict | None:
            reused = pool.take(state.client.name) if state.client.name in self.settings.reuse else None
            if reused is not None:
                reused.conn.max_body = self.settings.max_body
                state.client = reused
            else:
                await state.client.open(self.settings.connect_timeout)
            return await self._ask(
                state,
                lambda c: c.connect(hostname, address, port, connect_macros),
                self.settings.command_timeout,
            )

        self.session_refusal = await self._decide(
            m.Stage.CONNECT, one, session=True, defaults=False
        )

    async def _ready(self) -> None:
        if self._opening is not None:
            await self._opening

    async def helo(self, name: str, macros: Mapping[str, str]) -> Reply | None:
        await self._ready()
        self.macros.update(macros)
        refusal = await self._decide(
            m.Stage.HELO,
            lambda s: self._ask(s, lambda c: c.helo(name, macros), self.settings.command_timeout),
            session=True,
            defaults=False,
        )
        if refusal is not None and self.session_refusal is None:
            self.session_refusal = refusal
        return refusal

    async def mail(self, sender: str, args: list[str], macros: Mapping[str, str]) -> Reply | None:
        await self._ready()
        if self.session_refusal is not None:
            return self.session_refusal
        self._new_transaction(macros)
        for state in self._states:
            state.message_done = False
            state.in_message = True
        return await self._decide(
            m.Stage.MAIL,
            lambda s: self._ask(s, lambda c: c.mail(sender, args, macros), self.settings.command_timeout),
        )

    async def rcpt(self, rcpt: str, args: list[str], macros: Mapping[str, str]) -> Reply | None:
        await self._ready()
        stage_macros = {**self._txn, **macros}
        return await self._decide(
            m.Stage.RCPT,
            lambda s: self._ask(s, lambda c: c.rcpt(rcpt, args, stage_macros), self.settings.command_timeout),
        )

    # -- without waiting: most scanners (rspamd) need no reply before end of message, and a
    # stage that waits for nothing should cost the session no task and no pause in reading

    def quick(self, stage: m.Stage) -> bool:
        """Whether `stage` can be answered now: every milter is connected and none owes a
        reply for it (the caller then uses the `*_now` method instead of awaiting)."""
        if self._opening is None or not self._opening.done() or self.session_refusal is not None:
            return False
        session = stage is m.Stage.HELO
        for state in self._states:
            if state.client.down is not None:
                return False  # the default action is decided on the slow path
            if self._usable(state, session) and state.client.conn.owes_reply(stage):
                return False
        return True

    def _send_now(self, send: Callable[[m.MilterConnection], bool], session: bool) -> None:
        for state in self._states:
            if self._usable(state, session):
                send(state.client.conn)
                state.client.flush(at_least=_BATCH)

    def helo_now(self, name: str, macros: Mapping[str, str]) -> None:
        self.macros.update(macros)
        self._send_now(lambda c: c.helo(name, macros), True)

    def mail_now(self, sender: str, args: list[str], macros: Mapping[str, str]) -> None:
        self._new_transaction(macros)
        for state in self._states:
            state.message_done = False
            state.in_message = True
        self._send_now(lambda c: c.mail(sender, args, macros), False)

    def rcpt_now(self, rcpt: str, args: list[str], macros: Mapping[str, str]) -> None:
        stage_macros = {**self._txn, **macros}
        self._send_now(lambda c: c.rcpt(rcpt, args, stage_macros), False)

    def _new_transaction(self, macros: Mapping[str, str]) -> None:
        self.macros.update(macros)
        self._txn = {"i": macros["i"]} if "i" in macros else {}

    def abort(self) -> None:
        """The transaction ended before end of message (RSET, a refusal, the client left)."""
        for state in self._states:
            if state.in_message and state.client.down is None:
                state.client.conn.abort()
                state.client.flush()
            state.in_message = False
            state.message_done = False

    def close(self) -> None:
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()
        for state in self._states:
            if state.client.name in self.settings.reuse and not state.in_message:
                pool.give(state.client)
            else:
                state.client.quit()

    # ------------------------------------------------------------------ plumbing

    def _usable(self, state: _State, session: bool) -> bool:
        if state.client.down is not None or state.session_done:
            return False
        return session or not state.message_done

    async def _ask(
        self, state: _State, send: Callable[[m.MilterConnection], bool], timeout: float
    ) -> ev.Verdict | None:
        """Send one command; its verdict, or None when the milter owes no reply."""
        client = state.client
        owed = send(client.conn)
        if not owed:
            client.flush(at_least=_BATCH)  # no reply owed: sent with the next command that is
            return None
        client.flush()
        event = await client.next_event(timeout)
        if not isinstance(event, ev.Verdict):
            raise MilterDown(f"milter {client.name}: unexpected {type(event).__name__}")
        return event

    async def _decide(
        self,
        stage: m.Stage,
        ask: Callable[[_State], Any],
        *,
        session: bool = False,
        defaults: bool = True,
    ) -> Reply | None:
        """Ask every milter still in play; the first refusal in list order. `defaults`: a
        milter that is down counts with `default_action` (not at HELO: like Postfix, a
        client is refused at MAIL, where it expects refusals)."""
        states = [s for s in self._states if self._usable(s, session)]
        dead = [s for s in self._states if s.client.down is not None]
        if len(states) == 1:
            results: list[object] = [await _settle(ask(states[0]))]
        else:
            results = list(await asyncio.gather(*(_settle(ask(s)) for s in states)))
        refusal: Reply | None = None
        for state, result in zip(states, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("%s; default action %s", result, self.settings.default_action)
                dead.append(state)
                continue
            assert result is None or isinstance(result, ev.Verdict)
            reply = self._verdict(state, stage, result, session)
            if reply is not None and refusal is None:
                refusal = reply
        if refusal is None and dead and defaults:
            refusal = self._default_reply()
        return refusal

    def _default_reply(self) -> Reply | None:
        match self.settings.default_action:
            case "accept":
                return None
            case "reject":
                return MILTER_REJECTED
            case _:
                return MILTER_TEMPFAILED

    def _verdict(self, state: _State, stage: m.Stage, verdict: ev.Verdict | None, session: bool) -> Reply | None:
        if verdict is None:
            return None
        match verdict.action:
            case m.Action.CONTINUE | m.Action.SKIP:
                return None
            case m.Action.ACCEPT:
                # libmilter: accept at a connection stage is for the session; at any other
                # (RCPT included) for the whole message
                if session:
                    state.session_done = True
                else:
                    state.message_done = True
                return None
            case m.Action.REJECT:
                return verdict.reply or MILTER_REJECTED
            case m.Action.TEMPFAIL:
                return verdict.reply or MILTER_TEMPFAILED
            case m.Action.DISCARD:
                if session:
                    self.session_discard = True
                else:
                    self.discard = True
                return None
            case m.Action.CONN_FAIL:
                return MILTER_CONN_FAILED
            case m.Action.SHUTDOWN:
                log.warning("milter %s: shut down; default action %s", state.client.name, self.settings.default_action)
                state.client.close()
                state.client.down = "shut down"
                return self._default_reply()

    # ------------------------------------------------------------------ end of message

    async def end_of_message(
        self,
        source: MessageSource,
        new_body: Callable[[], BodySink],
        macros: Mapping[str, str],
        trace: HeaderField | None = None,
    ) -> MessageVerdict:
        """Show the message to every milter still interested; their combined verdict.
        `trace`: our own Received: field, shown first as Postfix does (milters such as
        rspamd and OpenDKIM count their insertion index from it)."""
        await self._ready()
        self.macros.update(macros)
        self._txn.update(macros)
        result = MessageVerdict()
        if self.session_refusal is not None:
            result.refusal = self.session_refusal
            return result
        self.discard = self.session_discard
        head = await off_loop(source, lambda: _read_head(source))
        header = split_header(head, complete=len(head) >= source.size)
        result.header = header
        result.trace_first = trace is not None
        shown = Header([trace, *header.fields], header.body_offset, header.separator) if trace else header
        states = [s for s in self._states if self._usable(s, False)]
        dead = any(s.client.down is not None for s in self._states)
        outcomes = await asyncio.gather(
            *(_settle(self._content(s, source, shown, new_body)) for s in states)
        )
        for state, outcome in zip(states, outcomes, strict=True):
            state.in_message = False
            if isinstance(outcome, BaseException):
                log.warning("%s; default action %s", outcome, self.settings.default_action)
                dead = True
                continue
            assert isinstance(outcome, _Outcome)
            reply = self._verdict(state, m.Stage.EOM, outcome.verdict, False)
            if outcome.body is not None and reply is None:
                if result.body is not None:
                    result.body.abort()
                result.body = outcome.body
            elif outcome.body is not None:
                outcome.body.abort()
            if reply is not None:
                result.refusal = result.refusal or reply
                result.notes.append(f"{state.client.name}: {outcome.verdict.action.value if outcome.verdict else '?'}")
                continue
            result.leading_space = bool(state.client.conn.protocol & m.SMFIP_HDR_LEADSPC)
            self._collect(result, state, outcome)
        if result.refusal is None and dead:
            result.refusal = self._default_reply()
        result.discard = self.discard
        self.discard = False
        if result.refusal is not None and result.body is not None:
            result.body.abort()
            result.body = None
        return result

    def _collect(self, result: MessageVerdict, state: _State, outcome: _Outcome) -> None:
        done: list[str] = []
        for edit in outcome.edits:
            match edit:
                case ev.AddHeader() | ev.InsertHeader() | ev.ChangeHeader():
                    result.header_edits.append(edit)
                case ev.ChangeFrom(address):
                    result.sender = address
                case ev.AddRecipient(address):
                    result.added.append(address)
                case ev.DeleteRecipient(address):
                    result.deleted.append(address)
                case ev.Quarantine(reason):
                    result.quarantine = reason or "milter quarantine"
                case ev.ReplaceBody():
                    pass
            done.append(type(edit).__name__)
        if outcome.body is not None:
            done.append("ReplaceBody")
        if done:
            counts = {name: done.count(name) for name in dict.fromkeys(done)}
            words = ", ".join(f"{n}={c}" for n, c in counts.items())
            result.notes.append(f"{state.client.name}: {words}")

    async def _content(
        self, state: _State, source: MessageSource, header: Header, new_body: Callable[[], BodySink]
    ) -> _Outcome:
        client = state.client
        conn = client.conn
        timeout = self.settings.content_timeout
        conn.data(self._txn)
        for f in header.fields:
            conn.header(f.name, f.value)
        conn.eoh(self._txn)
        client.flush(at_least=_BATCH)
        early: ev.Verdict | None = None
        if conn.wants(m.Stage.BODY):
            early = await self._send_body(client, source, header.body_offset, timeout)
        if early is None:
            conn.end_of_message(self._txn)
            client.flush()
        outcome = _Outcome()
        body: BodySink | None = None
        try:
            # every reply still owed is read, so the next transaction starts in step
            while outcome.verdict is None and (early is None or conn.pending or conn.has_events):
                event = await client.next_event(timeout)
                match event:
                    case ev.Verdict(stage=m.Stage.EOM):
                        outcome.verdict = event
                    case ev.Verdict():
                        if early is None and event.action not in _GO_ON:
                            early = event
                    case ev.ReplaceBody(data):
                        if body is None:
                            body = new_body()
                        body.write(data)
                    case ev.Negotiated() | ev.Progress() | ev.Failed():
                        raise MilterDown(f"milter {client.name}: unexpected {type(event).__name__}")
                    case _:
                        outcome.edits.append(event)
        except BaseException:
            if body is not None:
                body.abort()
            raise
        if early is not None:
            # refused before end of message: its edits (if any came) do not count
            if outcome.verdict is None:
                conn.abort()
                client.flush()
            outcome.verdict = early
            outcome.edits.clear()
            if body is not None:
                body.abort()
                body = None
        outcome.body = body
        return outcome

    async def _send_body(
        self, client: MilterClient, source: MessageSource, offset: int, timeout: float
    ) -> ev.Verdict | None:
        """Stream the body in chunks without waiting for each reply. Returns a refusal that
        came back already (the body stops there); SMFIR_SKIP stops it too."""
        conn = client.conn
        size = conn.chunk_size
        stream = await off_loop(source, source.read_back)
        try:
            await off_loop(source, lambda: stream.seek(offset))
            while True:
                chunk = await off_loop(source, lambda: stream.read(size))
                if not chunk:
                    return None
                conn.body(chunk)
                if conn.unsent >= _BATCH:
                    client.flush()
                    await client.drain(timeout)
                while not isinstance(event := client.ready_event(), Wait):
                    if not isinstance(event, ev.Verdict):
                        raise MilterDown(f"milter {client.name}: unexpected {type(event).__name__}")
                    if event.action is m.Action.SKIP:
                        return None
                    if event.action is not m.Action.CONTINUE:
                        return event
        finally:
            stream.close()


_GO_ON = (m.Action.CONTINUE, m.Action.SKIP)
#: queued commands are written once this much waits (or a reply is needed)
_BATCH = 64 * 1024


@dataclass(slots=True)
class _Outcome:
    verdict: ev.Verdict | None = None
    edits: list[ev.Edit] = field(default_factory=list)
    body: BodySink | None = None


async def _settle(awaitable: Any) -> object:
    """The awaitable's result, or the `MilterDown`/`ValueError` it raised (a value)."""
    try:
        return await awaitable
    except (MilterDown, ValueError) as err:
        return err


def _read_head(source: MessageSource) -> bytes:
    with source.read_back() as stream:
        return stream.read(MAX_HEADER_SECTION)
