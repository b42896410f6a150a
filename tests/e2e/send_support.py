"""Helpers for the send-path end-to-end tests: recording SMTP sinks and a mailhaven to relay.

`Sink` is an aiosmtpd server in a thread on a loopback address (127.0.0.x:port) that records
every transaction it accepts. Per recipient it answers what `rcpt_replies` says (default 250),
so one transaction can mix 250/450/550; it can require STARTTLS + AUTH (a trustme certificate),
and `on_data` runs in the sink's thread right after its 250 for DATA is written (the crash test
SIGKILLs mailhaven there). A sink that is not started refuses connections (nothing listens).
`stop()` then `start()` again reuses the same address and port.

`relay_server(...)` builds a `tests.support.server.MailServer` whose `[relay]` points at a test
DNS server and a sink port, with short retry times; `send()` submits one message over SMTP;
`attempt_lines()` / `parse_attempt()` read Postfix-shaped delivery lines from the maillog;
`read_dsn()` checks and parses an RFC 3464 report found in a Maildir.

SECURITY: test code only; everything binds loopback addresses.
"""

from __future__ import annotations

import contextlib
import email
import email.message
import email.policy
import email.utils
import re
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from tests.support.server import MailServer

POLL = 0.02

#: `QID: to=<a>, [orig_to=<b>, ]relay=R, delay=D, delays=a/b/c/d, dsn=X.Y.Z, status=S (text)`
ATTEMPT = re.compile(
    r"(?P<qid>[A-Za-z0-9]+): to=<(?P<to>[^>]*)>,(?: orig_to=<[^>]*>,)? relay=(?P<relay>\S+),"
    r" delay=(?P<delay>[0-9.]+), delays=(?P<delays>[0-9.]+/[0-9.]+/[0-9.]+/[0-9.]+),"
    r" dsn=(?P<dsn>\d\.\d{1,3}\.\d{1,3}), status=(?P<status>sent|deferred|bounced|expired)"
    r" \((?P<text>.*)\)$"
)
QUEUED = re.compile(r"queued as ([A-Za-z0-9]+)")


def free_port_on(hosts: Sequence[str]) -> int:
    """A TCP port that is free on every one of `hosts` (all loopback addresses)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind((hosts[0], 0))
            port = int(first.getsockname()[1])
            ok = True
            for host in hosts[1:]:
                with socket.socket() as other:
                    try:
                        other.bind((host, port))
                    except OSError:
                        ok = False
                        break
            if ok:
                return port
    raise RuntimeError(f"no common free port on {hosts}")


@dataclass
class Received:
    """One transaction a sink accepted."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    peer: str
    tls: bool
    login: str | None

    @property
    def message(self) -> email.message.Message:
        return email.message_from_bytes(self.content, policy=email.policy.compat32)


@dataclass
class Sink:
    """A recording SMTP server on `host:port` (see the module docstring)."""

    host: str
    port: int
    #: address (lower case) -> "250 ..." / "450 4.2.1 ..." / "550 5.1.1 ..."; others get 250.
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    tls_context: ssl.SSLContext | None = None
    #: (login, password) required after STARTTLS; None: no AUTH.
    credentials: tuple[str, str] | None = None
    #: Called in the sink's thread after the DATA 250 went out (with the transaction).
    on_data: Callable[[Received], None] | None = None
    #: Called in the sink's thread just before that 250 (only when `on_data` is set too).
    before_data_reply: Callable[[Received], None] | None = None
    received: list[Received] = field(default_factory=list)
    #: every RCPT TO address seen, with the reply code given
    rcpt_log: list[tuple[str, int]] = field(default_factory=list)
    auth_failures: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Condition()
        self._controller: Controller | None = None

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> Sink:
        assert self._controller is None, "already started"
        kwargs: dict[str, Any] = {}
        if self.tls_context is not None:
            kwargs.update(tls_context=self.tls_context, require_starttls=True)
        if self.credentials is not None:
            kwargs.update(
                auth_required=True, auth_require_tls=True, authenticator=self._authenticate
            )
        self._controller = Controller(
            _Handler(self), hostname=self.host, port=self.port, ready_timeout=5, **kwargs
        )
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            with contextlib.suppress(Exception):
                self._controller.stop()
            self._controller = None

    @property
    def running(self) -> bool:
        return self._controller is not None

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- observation --------------------------------------------------------------------------
    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Wait until at least `count` transactions were accepted; return them all."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.received) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"sink {self.host}:{self.port} got {len(self.received)} message(s),"
                        f" wanted {count}; RCPTs seen: {self.rcpt_log}"
                    )
                self._lock.wait(left)
            return list(self.received)

    def delivered_to(self) -> list[str]:
        with self._lock:
            return [r for t in self.received for r in t.rcpt_tos]

    # -- aiosmtpd hooks -----------------------------------------------------------------------
    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert self.credentials is not None
        if isinstance(data, LoginPassword) and (
            data.login.decode(),
            data.password.decode(),
        ) == self.credentials:
            return AuthResult(success=True, auth_data=data)
        self.auth_failures += 1
        return AuthResult(success=False, handled=False)

    def _record(self, item: Received) -> None:
        with self._lock:
            self.received.append(item)
            self._lock.notify_all()


class _Handler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        answer = self.sink.rcpt_replies.get(address.lower(), "250 2.1.5 OK")
        self.sink.rcpt_log.append((address.lower(), int(answer[:3])))
        if answer.startswith("2"):
            envelope.rcpt_tos.append(address)
        return answer

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        auth = session.auth_data
        login = auth.login.decode() if isinstance(auth, LoginPassword) else None
        item = Received(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            content=bytes(envelope.original_content or envelope.content or b""),
            peer=peer,
            tls=session.ssl is not None,
            login=login,
        )
        self.sink._record(item)
        if self.sink.on_data is None:
            return "250 2.0.0 OK accepted"
        if self.sink.before_data_reply is not None:
            self.sink.before_data_reply(item)  # e.g. SIGSTOP the client: it cannot act on the 250
        await server.push("250 2.0.0 OK accepted")  # the 250 is on the wire now...
        self.sink.on_data(item)  # ...and then, e.g., the client process dies
        return "250 2.0.0 OK accepted"


# ---------------------------------------------------------------------- mailhaven as relay


def relay_settings(
    *,
    dns: tuple[str, int] | None,
    port: int,
    local_users: Sequence[str] = ("postmaster", "alice"),
    minimal_backoff: float = 1,
    maximal_backoff: float = 2,
    lifetime: float = 3600,
    relay: Mapping[str, Any] | None = None,
    **top: Any,
) -> dict[str, Any]:
    """Settings for `MailServer`: short backoff, relay to `port`, DNS at `dns`, no TLS."""
    relay_table: dict[str, Any] = {"port": port, "tls": "none"}
    if dns is not None:
        relay_table["nameservers"] = [f"{dns[0]}:{dns[1]}"]
    relay_table.update(relay or {})
    settings: dict[str, Any] = {
        "local_domains": ["localhost"],
        "local_users": list(local_users),
        "log_level": "info",
        "queue": {
            "minimal_backoff": minimal_backoff,
            "maximal_backoff": maximal_backoff,
            "lifetime": lifetime,
        },
        "relay": relay_table,
    }
    settings.update(top)
    return settings


def message_bytes(mark: str, to: str, sender: str = "alice@localhost") -> bytes:
    return (
        f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: send test {mark}\r\n"
        f"Date: {email.utils.formatdate()}\r\nMessage-ID: <{mark}@localhost>\r\n\r\n"
        f"body of {mark}\r\n"
    ).encode()


def send(
    server: MailServer,
    recipients: Sequence[str],
    *,
    mark: str = "m1",
    sender: str = "alice@localhost",
    port: int | None = None,
    rcpt_options: Sequence[str] = (),
) -> str:
    """Submit one message over SMTP (from a trusted loopback client); returns the queue id."""
    with smtplib.SMTP(server.host, port or server.smtp_port, timeout=20) as s:
        s.ehlo("client.test")
        code, text = s.mail(sender)
        assert code == 250, text
        for rcpt in recipients:
            code, text = s.rcpt(rcpt, list(rcpt_options))
            assert code == 250, (rcpt, code, text)
        code, text = s.data(message_bytes(mark, recipients[0], sender))
        assert code == 250, text
        match = QUEUED.search(text.decode())
        assert match, text
        return match.group(1)


def attempt_lines(server: MailServer, qid: str) -> list[re.Match[str]]:
    """Every delivery-attempt line of message `qid`, parsed (lines must match the shape)."""
    out = []
    for line in server.log_lines():
        if f"{qid}: to=<" in line:
            match = ATTEMPT.search(line)
            assert match, f"delivery line not in Postfix's shape: {line!r}"
            out.append(match)
    return out


def wait_attempt(
    server: MailServer, qid: str, to: str, status: str, *, count: int = 1, timeout: float = 10.0
) -> list[re.Match[str]]:
    """Wait for `count` attempt lines for (qid, to) with `status`."""
    deadline = time.monotonic() + timeout
    while True:
        found = [
            m for m in attempt_lines(server, qid) if m["to"] == to and m["status"] == status
        ]
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{qid}: {len(found)} status={status} line(s) for <{to}>, wanted {count}\n"
                + server.log_tail()
            )
        time.sleep(POLL)


def check_delays(match: re.Match[str]) -> None:
    """delay= is a number and delays=a/b/c/d are four non-negative numbers summing to ~delay."""
    parts = [float(x) for x in match["delays"].split("/")]
    assert len(parts) == 4 and all(p >= 0 for p in parts)
    assert abs(sum(parts) - float(match["delay"])) < 0.1, match.group(0)


@dataclass
class DSN:
    """An RFC 3464 report, parsed with the stdlib `email` package."""

    message: email.message.Message
    per_message: email.message.Message
    per_recipient: list[email.message.Message]
    original: email.message.Message | None
    human: str


def read_dsn(path: Path) -> DSN:
    """Parse and check the structure of a delivery status notification (RFC 3464/6522)."""
    msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report", msg.get_content_type()
    assert msg.get_param("report-type") == "delivery-status", msg["Content-Type"]
    parts = msg.get_payload()
    assert isinstance(parts, list) and len(parts) >= 2, parts
    assert parts[0].get_content_type() == "text/plain"
    human = parts[0].get_payload(decode=True).decode("utf-8", "replace")
    status_part = parts[1]
    assert status_part.get_content_type() == "message/delivery-status"
    groups = status_part.get_payload()
    assert isinstance(groups, list) and len(groups) >= 2, groups
    per_message, per_recipient = groups[0], groups[1:]
    assert per_message["Reporting-MTA"], "Reporting-MTA is required (RFC 3464 2.2.2)"
    for group in per_recipient:
        assert group["Final-Recipient"], "Final-Recipient is required (RFC 3464 2.3.2)"
        assert group["Action"], "Action is required (RFC 3464 2.3.3)"
        assert re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", group["Status"].split()[0])
    original = None
    if len(parts) >= 3:
        third = parts[2]
        assert third.get_content_type() in ("message/rfc822", "text/rfc822-headers")
        if third.get_content_type() == "message/rfc822":
            payload = third.get_payload()
            original = payload[0] if isinstance(payload, list) else None
        else:  # headers only (RET=HDRS, or no RET: RFC 3461 4.3 lets the MTA choose)
            original = email.message_from_string(str(third.get_payload()))
    return DSN(msg, per_message, per_recipient, original, human)


def recipient_group(dsn: DSN, address: str) -> email.message.Message:
    for group in dsn.per_recipient:
        if group["Final-Recipient"].split(";", 1)[1].strip().lower() == address.lower():
            return group
    raise AssertionError(
        f"no per-recipient group for {address}: {[g['Final-Recipient'] for g in dsn.per_recipient]}"
    )
