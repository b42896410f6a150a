"""A tiny synchronous driver for the sans-I/O SMTP server core, used by the core's tests.

It plays the application: answers every decision with a policy function (default: accept), and
records the events. Each transcript can be fed whole or one byte at a time; the output must be
the same either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from mailhaven.proto import smtp_server_events as ev
from mailhaven.proto.replies import Reply
from mailhaven.proto.smtp_server import NEED_DATA, PAUSED, ServerConnection, ServerSettings, Wait

Policy = Callable[[ev.Event], Reply | None]
#: Answers an AuthStart/AuthResponse through `auth_challenge` or `auth_finish`.
AuthPolicy = Callable[[ServerConnection, ev.AuthStart | ev.AuthResponse], None]


def auth_accept_all(conn: ServerConnection, event: ev.AuthStart | ev.AuthResponse) -> None:
    conn.auth_finish(Reply(235, "Authentication successful", "2.7.0"), "user")


def accept_all(event: ev.Event) -> Reply | None:
    match event:
        case ev.BodyEnd():
            return Reply(250, "Ok: queued as TEST", "2.0.0")
        case ev.Verify():
            return Reply(252, "Cannot VRFY user", "2.5.2")
        case ev.Expand():
            return Reply(502, "EXPN disabled", "5.5.1")
        case ev.Etrn():
            return Reply(250, "Queuing started", "2.0.0")
        case _:
            return None


@dataclass
class Run:
    output: bytes
    events: list[ev.Event] = field(default_factory=list)

    @property
    def codes(self) -> list[int]:
        """Reply codes, one per reply (continuation lines folded)."""
        codes = []
        for line in self.output.split(b"\r\n"):
            if len(line) >= 4 and line[3:4] == b" ":
                codes.append(int(line[:3]))
            elif len(line) == 3:
                codes.append(int(line))
        return codes

    @property
    def body(self) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, ev.BodyData))

    def text(self) -> str:
        return self.output.decode("utf-8", "replace")


def drive(
    conn: ServerConnection, policy: Policy, run: Run, auth: AuthPolicy = auth_accept_all
) -> None:
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            run.output += conn.data_to_send()
            return
        assert event is not PAUSED, "driver answers every decision at once"
        assert not isinstance(event, Wait)
        run.events.append(event)
        match event:
            case ev.StartTLS():
                conn.tls_established()
            case ev.AuthStart() | ev.AuthResponse():
                auth(conn, event)
            case ev.LmtpBodyEnd():  # one answer per recipient, in order (RFC 2033 §4.2)
                for rcpt in event.recipients:
                    conn.respond(policy(rcpt) or Reply(250, f"Ok: <{rcpt.address}> delivered", "2.0.0"))
            case (
                ev.Hello()
                | ev.MailFrom()
                | ev.RcptTo()
                | ev.BodyEnd()
                | ev.Verify()
                | ev.Expand()
                | ev.Etrn()
            ):
                answer = policy(event)
                if answer is None:
                    conn.accept()
                else:
                    conn.respond(answer)
            case _:
                pass
        run.output += conn.data_to_send()


def converse(
    data: bytes,
    *,
    settings: ServerSettings | None = None,
    policy: Policy = accept_all,
    byte_at_a_time: bool = False,
    greet_first: bool = True,
    eof: bool = False,
) -> Run:
    conn = ServerConnection(settings or ServerSettings(hostname="mx.test"))
    run = Run(b"")
    if not greet_first:
        conn.receive_data(data)
        data = b""
    conn.greet()
    run.output += conn.data_to_send()
    drive(conn, policy, run)
    chunks = [data[i : i + 1] for i in range(len(data))] if byte_at_a_time else [data]
    for chunk in chunks:
        if chunk:
            conn.receive_data(chunk)
            drive(conn, policy, run)
    if eof:
        conn.receive_data(b"")
        drive(conn, policy, run)
    run.output += conn.data_to_send()
    return run
