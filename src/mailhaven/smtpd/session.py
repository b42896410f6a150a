"""One SMTP session: the thin asyncio adapter around `proto.smtp_server.ServerConnection`.

An `asyncio.BufferedProtocol`, not streams: it owns the input buffer (through the core), so plaintext
that arrives before a STARTTLS handshake is provably dropped, and an idle connection costs only
this object, the core's state and the transport (no task, no StreamReader): the 10,000 idle
connections target needs that. The rules are those of `net.stream` (the POP3 and SMTP client
stream), and the STARTTLS handshake is its `start_tls`.

Flow: `data_received` feeds the core and answers its events. Synchronous decisions (HELO, MAIL,
RCPT, VRFY, EXPN) are answered at once by `SMTPPolicy`; slow ones (queue commit, AUTH password
check, ETRN, STARTTLS handshake) run in a task while reading is paused, so pipelined input waits
in the core and replies stay in order. Body chunks stream straight into the spool's writer.
A listener's milters are asked at connect, HELO, MAIL, RCPT and end of data through
`smtpd.milter_stages`.

Failure containment: an unexpected exception while answering a decision answers `451 4.3.0` and
is logged with its traceback; anything worse closes only this session with 421.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import replace
from typing import TYPE_CHECKING, cast

from mailhaven import maillog
from mailhaven.checks.gate import Screen
from mailhaven.checks.milter.chain import MilterChain
from mailhaven.faults import crash_point
from mailhaven.mailbox.folders import SPAM_FLAG
from mailhaven.maillog import client_label
from mailhaven.net.client_names import UNKNOWN, ClientNames
from mailhaven.net.stream import start_tls
from mailhaven.proto import replies as r
from mailhaven.proto import smtp_server_events as ev
from mailhaven.proto.envelope import Envelope, RecipientSpec
from mailhaven.proto.replies import Reply
from mailhaven.proto.smtp_server import ServerConnection, State, Wait
from mailhaven.smtpd import milter_stages
from mailhaven.smtpd.inbound_gate import StoredWriter
from mailhaven.smtpd.policy import SessionFacts, protocol_name
from mailhaven.smtpd.profile import AuthStep, ListenerProfile, Writer

if TYPE_CHECKING:
    from mailhaven.smtpd.server import SMTPService

log = logging.getLogger("mailhaven.smtpd")


def describe_tls_error(err: BaseException) -> str:
    """A failed handshake for the log: a timeout's exception has no text of its own."""
    if isinstance(err, TimeoutError):
        return "handshake timed out"
    return str(err) or type(err).__name__


class CommandStats:
    """Per-command counts for the disconnect log, in Postfix's shape: `name=ok` or
    `name=ok/total` when some failed, then `commands=` for all (pflogsumm reads these). Fed by
    the core's `Answered` events."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}

    def count(self, answered: ev.Answered) -> None:
        stat = self.counts.setdefault(answered.command, [0, 0])
        stat[1] += 1
        if answered.reply.code < 400:
            stat[0] += 1

    def summary(self) -> str:
        counts = self.counts.items()
        words = [f"{name}={ok}" if ok == n else f"{name}={ok}/{n}" for name, (ok, n) in counts]
        ok = sum(good for good, _ in self.counts.values())
        total = sum(n for _, n in self.counts.values())
        words.append(f"commands={ok}" if ok == total else f"commands={ok}/{total}")
        return " ".join(words)


#: One receive buffer for every session of the event loop: `buffer_updated` consumes it before
#: returning, so sharing is safe, and it spares asyncio's 256 KiB allocation per recv() (which
#: showed as the largest single cost in profiles) and a buffer per idle connection.
_READ_BUFFER = memoryview(bytearray(256 * 1024))


class SMTPSession(asyncio.BufferedProtocol):
    """The protocol object for one connection (see the module docstring)."""

    def __init__(self, service: SMTPService, profile: ListenerProfile) -> None:
        self.service = service
        self.profile = profile
        self.conn = ServerConnection(profile.settings)
        self.facts = SessionFacts(client_ip="?")
        self.transport: asyncio.Transport | None = None
        self.writer: Writer | None = None
        self.last_activity = 0.0
        #: When the core last made progress (an event or a reply): the command deadline runs
        #: from here, so a command trickled in byte by byte cannot take forever.
        self.waiting_since = 0.0
        #: When the body of the current message began (DATA or the first BDAT), for the
        #: message deadline; None outside a body.
        self.message_started: float | None = None
        self._busy = False
        self._write_paused = False
        self._auth: AuthStep | None = None
        self._errors_flushed = 0
        self._client_logged = False
        #: Decrypted input that arrived while the STARTTLS handshake was finishing (see
        #: `_start_tls`); None when no handshake is in progress.
        self._tls_early: bytearray | None = None
        #: The client's close_notify came with its Finished (during `_start_tls`): an end of
        #: input fed after `_tls_early`.
        self._tls_eof = False
        self._gone = False
        if service.storage is not None:
            self.conn.data_gate = self._data_gate
        #: the client name lookup before the greeting, while it runs
        self._lookup: asyncio.Future[None] | None = None
        self.stats = CommandStats()
        #: this client's standing at the gate (its DNS list lookups start at connect)
        self.screen: Screen | None = None
        #: this session's milters (None: the listener has none)
        self.milters: MilterChain | None = None

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a cast, not an isinstance check: uvloop's transports are not asyncio.Transport
        # subclasses, though they provide its interface (`mailhaven.runtime.eventloop`)
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.facts.client_ip = str(peer[0])
        if transport.get_extra_info("ssl_object") is not None:
            self.facts.tls = self._tls_summary()
        self.last_activity = self.waiting_since = self.service.loop.time()
        refusal = self.service.admit(self)
        if refusal is not None:  # refused before any lookup: a flood costs us no DNS
            maillog.info(log, "connect from %s", self.label)
            log.warning("%s: %s", self.label, refusal.text)
            self.conn.greet(refusal)
            self._flush()
            transport.close()
            return
        self._open_gate()
        names = self.service.client_names
        if names is None:
            self._connected(self.last_activity)
        else:
            # Postfix names the client before it logs the connect and greets; in a task of
            # this session's own, so other sessions never wait for its DNS. Input is not
            # paused: the core still sees a client that talks before the greeting.
            self._lookup = asyncio.ensure_future(self._name_client(names, self.last_activity))

    async def _name_client(self, names: ClientNames, since: float) -> None:
        try:
            found = await names.lookup(self.facts.client_ip)
        except Exception:  # a bug in the lookup must not cost the client its session
            log.exception("%s: client name lookup failed", self.label)
            found = UNKNOWN
        self._lookup = None
        if self._gone:
            return
        self.facts.client_name = found.name
        if found.warning:
            log.warning("%s", found.warning)
        self._connected(since)

    def _connected(self, since: float) -> None:
        """Log the connect and greet, `greet_pause` after the connection came (`since`)."""
        maillog.info(log, "connect from %s", self.label)
        if self.profile.milters is not None:
            self.milters = milter_stages.start(
                self.profile.milters, self.facts, self.profile.name, self.transport
            )
        pause = self.service.limits.greet_pause
        left = since + pause - self.service.loop.time() if pause > 0 else 0.0
        if left > 0:
            self.service.loop.call_later(left, self._greet)
        else:
            self._greet()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(_READ_BUFFER[:nbytes]))

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.service.loop.time()
        if self._tls_early is not None:
            self._tls_early += data  # inside TLS already: fed once the core knows it
            return
        self.conn.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        if self._tls_early is not None:
            self._tls_eof = True  # the core is still in STARTTLS: see `_start_tls`
            return False
        self.conn.receive_data(b"")
        self._process()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended()

    def _ended(self) -> None:
        """The one way out of a session, exactly once: asyncio does not call `connection_lost`
        for a connection that dies inside a STARTTLS handshake, so that path calls this too."""
        if self._gone:
            return
        self._gone = True
        if self._lookup is not None:  # gone while being named: its connect is still logged
            self._lookup.cancel()
            self._lookup = None
            maillog.info(log, "connect from %s", self.label)
        self.discard_message()
        if self.milters is not None:
            self.milters.close()
        self.service.forget(self)
        if not self.conn.closed and self.conn.in_transaction:
            log.info("lost connection after %s from %s", self._last_command(), self.label)
        while not isinstance(event := self.conn.next_event(), Wait):
            if isinstance(event, ev.Answered):  # a reply sent as the session was cut
                self.stats.count(event)
        maillog.info(log, "disconnect from %s %s", self.label, self.stats.summary())

    def pause_writing(self) -> None:
        self._write_paused = True
        self._set_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._set_reading()

    # ------------------------------------------------------------------ helpers

    @property
    def label(self) -> str:
        return client_label(self.facts.client_ip, self.facts.client_name)

    def _last_command(self) -> str:
        return "DATA" if self.conn.in_body else "MAIL"

    def _greet(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.conn.greet()
        self._flush()
        self._process()

    def _set_reading(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self._busy or self._write_paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if not data or self.transport is None or self.transport.is_closing():
            return
        errors = self.conn.error_count
        limits = self.service.limits
        if (
            errors > self._errors_flushed
            and errors >= limits.soft_error_limit
            and not self.conn.closed
        ):
            # Postfix's smtpd_error_sleep_time: slow down a client that keeps erring.
            self._errors_flushed = errors
            self._busy = True
            self._set_reading()
            self.service.loop.call_later(limits.error_sleep, self._delayed_write, data)
            return
        self._errors_flushed = errors
        self.transport.write(data)

    def _delayed_write(self, data: bytes) -> None:
        self._busy = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            self._set_reading()
            self._process()

    def discard_message(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        if self.milters is not None:
            self.milters.abort()

    def timeout(self, what: str = "timeout") -> None:
        """Called by the service's reaper when the client has been silent too long, or has
        taken too long over one command or one message (`what` says which)."""
        log.info("%s after %s from %s", what, self.conn.state.value.upper(), self.label)
        self.close_with(r.timeout_exceeded(self.profile.settings.hostname))

    def close_with(self, reply: Reply) -> None:
        if self._tls_early is not None:
            # Inside a STARTTLS handshake a plaintext reply would be garbage to the client's
            # TLS layer: cut the connection and end the session now (uvloop's start_tls only
            # notices the abort at its handshake timeout; `_ended` runs once either way).
            if self.transport is not None:
                self.transport.abort()
            self._ended()
            return
        self.conn.close_with(reply)
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def shutdown(self) -> None:
        """Graceful stop: idle sessions end now; a transaction in flight may finish first."""
        if not self._busy and not self.conn.in_transaction:
            self.close_with(r.shutting_down(self.profile.settings.hostname))

    # ------------------------------------------------------------------ event loop

    def _process(self) -> None:
        if self._busy or self.transport is None:
            return
        progress = False
        try:
            while not self._busy:
                event = self.conn.next_event()
                if isinstance(event, Wait):
                    break  # NEED_DATA, or PAUSED while a decision is answered elsewhere
                progress = True
                self._handle(event)
            self._track_deadlines(progress)
        except Exception:
            log.exception("%s: internal error in session", self.label)
            self.close_with(r.INTERNAL_ERROR_CLOSING)
            return
        self._flush()
        if self.conn.closed and self.transport is not None and not self._busy:
            self.transport.close()
        elif self.service.shutting_down and not self.conn.in_transaction and not self._busy:
            self.shutdown()

    def _track_deadlines(self, progress: bool) -> None:
        """Restart the command deadline when the core made progress; start or end the message
        deadline as a body begins or its transaction ends."""
        now = self.service.loop.time()
        if progress or self.conn.has_output:
            self.waiting_since = now
        in_body = self.conn.in_body
        if in_body or self.conn.in_transaction:
            if in_body and self.message_started is None:
                self.message_started = now
        else:
            self.message_started = None

    def _handle(self, event: ev.Event) -> None:
        try:
            self._dispatch(event)
        except Exception:
            log.exception("%s: internal error handling %s", self.label, type(event).__name__)
            if self.conn.awaiting_decision:
                if isinstance(event, ev.AuthStart | ev.AuthResponse):
                    self.conn.auth_finish(r.INTERNAL_ERROR, None)
                else:
                    self.conn.respond(r.INTERNAL_ERROR)
                    if isinstance(event, ev.MailFrom):
                        self.discard_message()

    def log_client(self) -> None:
        """`<QID>: client=` once per transaction, at the first accepted recipient, as Postfix
        does (pflogsumm counts these lines as received messages)."""
        if self.writer is None or self._client_logged:
            return
        self._client_logged = True
        sasl = f", sasl_username={self.facts.auth_user}" if self.facts.auth_user else ""
        maillog.info(log, "%s: client=%s%s", self.writer.queue_id, self.label, sasl)

    def _dispatch(self, event: ev.Event) -> None:
        policy = self.profile.policy
        match event:
            case ev.Hello():
                self.facts.helo = event.name
                if self.milters is not None:
                    slow = milter_stages.helo(self, self.milters, event)
                    if slow is not None:
                        self._run(slow)
                        return
                self.conn.accept()
            case ev.MailFrom():
                refusal = policy.mail_from(self.facts, event)
                if refusal is None and not self.service.message_allowed(self.facts.client_ip):
                    refusal = r.too_much_mail_from(self.facts.client_ip)
                if refusal is None and self.screen is not None and self.profile.gate:
                    refusal = self.profile.gate.mail(self.screen, self.facts, event.address)
                size = event.params.size
                if refusal is None and self.service.storage is not None and size is not None:
                    refusal = self.service.storage(size)  # without SIZE=: asked at DATA
                if refusal is not None:
                    self._log_reject("MAIL", refusal, event.address, None)
                    self.conn.respond(refusal)
                    return
                self.writer = self._new_message()
                self._client_logged = False
                if self.milters is not None:
                    slow = milter_stages.mail(self, self.milters, event, self.writer.queue_id)
                    if slow is not None:
                        self._run(slow)
                        return
                self.conn.accept()
            case ev.RcptTo():
                refusal = policy.rcpt_to(self.facts, event)
                if refusal is None and self.screen is not None and self.profile.gate:
                    answer = self.profile.gate.rcpt(
                        self.screen, self.facts, self._sender(), event.address
                    )
                    if answer is not None and not isinstance(answer, Reply):
                        self._run(self._gate_rcpt(event.address, answer))
                        return
                    refusal = answer
                if refusal is not None:
                    self._log_reject("RCPT", refusal, self._sender(), event.address)
                    self.conn.respond(refusal)
                elif self.milters is not None and (
                    slow := milter_stages.rcpt(self, self.milters, event)
                ) is not None:
                    self._run(slow)
                else:
                    self.log_client()
                    self.conn.accept()
            case ev.BodyData():
                if self.writer is None:
                    self.writer = self._new_message()
                self.writer.write(event.data)
            case ev.BodyEnd():
                self._run(self._commit())
            case ev.LmtpBodyEnd():
                self._run(self._deliver_lmtp(event))
            case ev.BodyAborted():
                log.info(
                    "%s: reject: %s from %s: %s",
                    self.writer.queue_id if self.writer else "NOQUEUE",
                    "DATA",
                    self.label,
                    event.reply.one_line(),
                )
                self.discard_message()
            case ev.Reset():
                self.discard_message()
            case ev.Verify():
                self.conn.respond(policy.verify(self.facts, event))
            case ev.Expand():
                self.conn.respond(policy.expand(self.facts, event))
            case ev.Etrn():
                self._run(self._etrn(event.argument))
            case ev.StartTLS():
                self._run(self._start_tls())
            case ev.AuthStart():
                self._run(self._auth_step(event.mechanism, event.initial, start=True))
            case ev.AuthResponse():
                self._run(self._auth_step("", event.line, start=False))
            case ev.Answered():
                self.stats.count(event)
            case ev.Closed():
                pass

    # ------------------------------------------------------------------ the gate (checks/)

    def _open_gate(self) -> None:
        """Hand the new client to the listener's gate: its DNS list lookups start now, in
        parallel with the client name lookup and the greeting."""
        gate = self.profile.gate
        if gate is None or self.transport is None:
            return
        local = self.transport.get_extra_info("sockname") or ("", 0)
        self.screen = gate.connect(self.facts.client_ip, str(local[0]))

    async def _gate_rcpt(self, address: str, answer: Awaitable[Reply | None]) -> None:
        """A RCPT TO decision that waits on DNS lists or the greylist (reading paused)."""
        refusal = await answer
        if refusal is not None:
            self._log_reject("RCPT", refusal, self._sender(), address)
            self.conn.respond(refusal)
        else:
            self.log_client()
            self.conn.accept()

    def _run(self, coro: Awaitable[None]) -> None:
        """Run a slow decision with reading paused; resume processing when it is answered."""
        self._busy = True
        self._flush()
        self._set_reading()
        task = asyncio.ensure_future(coro)
        self.service.track(task)
        task.add_done_callback(self._resume)

    def _resume(self, task: asyncio.Future[None]) -> None:
        self._busy = False
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: internal error", self.label, exc_info=task.exception())
            if self.conn.awaiting_decision:
                self.conn.respond(r.INTERNAL_ERROR)
        self._set_reading()
        self._process()

    def _data_gate(self) -> Reply | None:
        """Refuse a body before it is sent when the queue's disk is (nearly) full."""
        assert self.service.storage is not None
        refusal = self.service.storage(0)
        if refusal is not None:
            self._log_reject("DATA", refusal, self._sender(), None)
        return refusal

    def _sender(self) -> str:
        return self.conn.mail.address if self.conn.mail else ""

    def _log_reject(self, stage: str, reply: Reply, sender: str, rcpt: str | None) -> None:
        to = f" to=<{rcpt}>" if rcpt is not None else ""
        log.info(
            "NOQUEUE: reject: %s from %s: %s; from=<%s>%s proto=%s helo=<%s>",
            stage,
            self.label,
            reply.one_line(),
            sender,
            to,
            "ESMTP" if self.conn.extended else "SMTP",
            self.facts.helo,
        )

    def _envelope(self) -> Envelope:
        mail = self.conn.mail
        assert mail is not None
        params = mail.params
        return Envelope(
            sender=mail.address,
            recipients=tuple(
                RecipientSpec(rcpt.address, rcpt.params.notify, rcpt.params.orcpt)
                for rcpt in self.conn.recipients
            ),
            body_type=params.body,
            smtputf8=params.smtputf8,
            dsn_ret=params.ret,
            dsn_envid=params.envid,
            declared_size=params.size,
            client_name=self.facts.client_name,
            client_address=self.facts.client_ip,
            helo=self.facts.helo,
            protocol=protocol_name(
                extended=self.conn.extended,
                tls=self.facts.tls is not None,
                auth=self.facts.auth_user is not None,
                utf8=params.smtputf8,
            ),
            auth_user=self.facts.auth_user,
        )

    async def _commit(self) -> None:
        writer = self.writer
        self.writer = None
        if writer is None:
            writer = self.service.sink.new_message()
        writer.no_bare_cr = True  # BodyEnd: the framing found no bare CR in it (`proto.body`)
        added, spam = b"", False
        if self.profile.inbound is not None:  # SPF/DKIM/DMARC/ARC: may refuse the message
            gate = await self.profile.inbound.run(
                self.facts, self._envelope(), cast(StoredWriter, writer), self.label
            )
            if gate.reply is not None:
                self.conn.respond(gate.reply)
                return
            writer, added, spam = gate.writer, gate.header, gate.spam
        try:
            envelope = self._envelope()
            if spam:  # the mailbox files it into the Junk folder (mailbox.folders)
                envelope = replace(envelope, extra={**envelope.extra, SPAM_FLAG: "yes"})
            if self.milters is not None:
                milter = await milter_stages.end_of_message(
                    self, self.milters, writer, envelope, self.profile.settings.hostname
                )
                if isinstance(milter, Reply):
                    self.conn.respond(milter)
                    if milter.code == 421:
                        self.close_with(milter)
                    return
                writer, envelope = milter
            reply = await self.service.sink.accept(writer, envelope, self.facts.tls, added)
        except Exception:
            log.exception("%s: cannot queue message from %s", writer.queue_id, self.label)
            writer.abort()
            reply = r.INTERNAL_ERROR
        if reply.code == 250:
            crash_point("before_250")
        self.conn.respond(reply)
        if self.service.shutting_down:
            self.close_with(r.shutting_down(self.profile.settings.hostname))

    # ------------------------------------------------------------------ LMTP listener

    def _new_message(self) -> Writer:
        store = self.profile.store
        return store.new_message() if store is not None else self.service.sink.new_message()

    async def _deliver_lmtp(self, event: ev.LmtpBodyEnd) -> None:
        """RFC 2033 §4.2: one reply per accepted recipient, in RCPT order, each the result
        of its delivery (an unexpected failure answers 451 for those still owed one)."""
        store, writer = self.profile.store, self.writer
        self.writer = None
        assert store is not None
        if writer is None:
            writer = store.new_message()
        envelope = replace(self._envelope(), protocol="LMTP")
        try:
            replies = await store.deliver(writer, envelope)
        except Exception:
            log.exception("%s: LMTP delivery failed", writer.queue_id)
            writer.abort()
            replies = []
        for n in range(len(event.recipients)):
            self.conn.respond(replies[n] if n < len(replies) else r.INTERNAL_ERROR)

    async def _etrn(self, argument: str) -> None:
        if self.profile.etrn is None:
            self.conn.respond(r.etrn_unable(argument))
            return
        self.conn.respond(await self.profile.etrn(self.facts, argument))

    def _tls_summary(self) -> str | None:
        if self.transport is None:
            return None
        obj = self.transport.get_extra_info("ssl_object")
        if obj is None:
            return None
        cipher = obj.cipher()
        bits = f" ({cipher[2]}/{cipher[2]} bits)" if cipher else ""
        return f"using {obj.version()} with cipher {cipher[0] if cipher else '?'}{bits}"

    async def _start_tls(self) -> None:
        context = self.profile.tls_context()
        assert self.transport is not None and context is not None
        # asyncio's SSLProtocol hands us the first decrypted bytes (a TLS 1.3 client such as
        # msmtp/GnuTLS sends EHLO in the flight with its Finished) *before* `start_tls`
        # returns, while the core is still in its STARTTLS phase, where it drops input as
        # pre-handshake plaintext: the client would wait forever. From here on every byte
        # reaching `data_received` has come through TLS (start_tls swaps the raw transport's
        # protocol synchronously, and reading was paused since the STARTTLS line), so it is
        # held and fed after `tls_established()`. Plaintext sent before the handshake is
        # still discarded by the core (CVE-2011-0411).
        self._tls_early = bytearray()
        try:
            new = await start_tls(
                self.transport,
                self,
                context,
                server_side=True,
                timeout=self.service.timeouts.tls_handshake,
            )
        except Exception as err:  # reset, timeout, not TLS at all: each ends the session
            self._tls_early = None
            log.info("SSL_accept error from %s: %s", self.label, describe_tls_error(err))
            self.transport.abort()
            self._ended()
            return
        except asyncio.CancelledError:  # shutting down: the slot is released all the same
            self._tls_early = None
            self.transport.abort()
            self._ended()
            raise
        early, self._tls_early = self._tls_early, None
        eof, self._tls_eof = self._tls_eof, False
        if self.conn.state is not State.STARTTLS:  # closed meanwhile (shutdown, timeout)
            new.abort()
            self._ended()
            return
        self.transport = new
        self.conn.tls_established()
        self.facts.tls = self._tls_summary()
        log.info("%s: TLS established: %s", self.label, self.facts.tls)
        # processed when `_resume` runs: the first command, then the client's close_notify
        # when it came in the same segment (asyncio delivers both before start_tls returns)
        if early:
            self.conn.receive_data(bytes(early))
        if eof:
            self.conn.receive_data(b"")

    async def _auth_step(self, mechanism: str, line: str | None, *, start: bool) -> None:
        auth = self.profile.authenticator
        if auth is None:
            self.conn.auth_finish(r.AUTH_TEMPORARY_FAILURE, None)
            return
        try:
            if start:
                self._auth = auth.start(self.facts, mechanism, line)
                line = None
            assert self._auth is not None
            result = await self._auth.respond(line)
        except Exception:
            # Answered here: during AUTH the core takes only auth_finish(), so `_resume`'s
            # generic 451 would be refused and the client left without any reply.
            log.exception("%s: internal error in AUTH", self.label)
            self._auth = None
            self.conn.auth_finish(r.AUTH_TEMPORARY_FAILURE, None)
            return
        if isinstance(result, str):
            self.conn.auth_challenge(result)
            return
        reply, user = result
        self._auth = None
        if user is not None and reply.is_success:
            self.facts.auth_user = user
        self.conn.auth_finish(reply, user)
