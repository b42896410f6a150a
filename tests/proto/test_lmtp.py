"""LMTP (RFC 2033) as a mode of the sans-I/O cores: the server with `ServerSettings(lmtp=True)`,
the client with `ClientConnection(lmtp=True)`, each on its own and talking to each other.
Every server transcript is fed whole and byte by byte."""

from __future__ import annotations

import pytest
from tests.proto.smtp_driver import Run, accept_all, converse

from mailhaven.proto import smtp_server_events as ev
from mailhaven.proto.envelope import RecipientSpec
from mailhaven.proto.replies import Reply
from mailhaven.proto.smtp_client import (
    ClientConnection,
    Closed,
    MailTransaction,
    Phase,
    SendBody,
    SessionFailed,
    StartTLSPolicy,
    TransactionDone,
    Wait,
)
from mailhaven.proto.smtp_server import ServerConnection, ServerSettings, State

LMTP = ServerSettings(hostname="store.test", lmtp=True, forbid_unauth_pipelining=False)
LHLO = b"LHLO mta.test\r\n"
ENVELOPE = b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<no@y.test>\r\nRCPT TO:<c@y.test>\r\n"


def refuse_no(event: ev.Event) -> Reply | None:
    """Refuses RCPT to no@ and gives each delivered recipient a reply naming it."""
    match event:
        case ev.RcptTo(address="no@y.test"):
            return Reply(550, "no such user", "5.1.1")
        case ev.RcptTo():
            return None
    return accept_all(event)


def both(data: bytes, **kw: object) -> Run:
    whole = converse(data, settings=LMTP, **kw)  # type: ignore[arg-type]
    bytewise = converse(data, settings=LMTP, byte_at_a_time=True, **kw)  # type: ignore[arg-type]
    assert whole.output == bytewise.output
    return whole


def test_lhlo_lists_the_extensions() -> None:
    run = both(LHLO)
    assert run.codes == [220, 250]
    assert b"250-store.test\r\n250-PIPELINING\r\n" in run.output
    assert b"250 CHUNKING\r\n" in run.output
    [hello] = [e for e in run.events if isinstance(e, ev.Hello)]
    assert hello == ev.Hello("mta.test", True)


@pytest.mark.parametrize("verb", [b"HELO", b"EHLO"])
def test_helo_and_ehlo_are_refused(verb: bytes) -> None:
    run = both(verb + b" mta.test\r\nMAIL FROM:<a@x.test>\r\n")
    assert run.codes == [220, 500, 503]
    assert b"500 5.5.1 Error: this is LMTP, send LHLO\r\n" in run.output
    assert b"503 5.5.1 Error: send LHLO first\r\n" in run.output


def test_lhlo_is_unknown_to_smtp() -> None:
    run = converse(LHLO, settings=ServerSettings(hostname="mx.test"))
    assert run.codes == [220, 500]


def test_one_reply_per_accepted_recipient_after_data() -> None:
    run = both(LHLO + ENVELOPE + b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n", policy=refuse_no)
    assert run.codes == [220, 250, 250, 250, 550, 250, 354, 250, 250, 221]
    [end] = [e for e in run.events if isinstance(e, ev.LmtpBodyEnd)]
    assert [r.address for r in end.recipients] == ["b@y.test", "c@y.test"]
    assert end.size == len(b"Subject: x\r\n\r\nhi\r\n")
    assert b"250 2.0.0 Ok: <b@y.test> delivered\r\n250 2.0.0 Ok: <c@y.test> delivered\r\n" in (
        run.output
    )
    data = [e for e in run.events if isinstance(e, ev.Answered) and e.command == "data"]
    assert len(data) == 1  # counted once, like SMTP


def test_per_recipient_replies_with_bdat() -> None:
    run = both(LHLO + ENVELOPE + b"BDAT 3\r\nabcBDAT 2 LAST\r\nde", policy=refuse_no)
    assert run.codes == [220, 250, 250, 250, 550, 250, 250, 250, 250]
    assert b"250 2.0.0 Ok: 3 octets received\r\n" in run.output


def test_a_refused_body_is_refused_for_every_recipient() -> None:
    settings = ServerSettings(
        hostname="store.test", lmtp=True, forbid_unauth_pipelining=False, max_message_size=5
    )
    run = converse(
        LHLO + ENVELOPE + b"DATA\r\n" + b"x" * 50 + b"\r\n.\r\nNOOP\r\n",
        settings=settings,
        policy=refuse_no,
    )
    assert run.codes == [220, 250, 250, 250, 550, 250, 354, 552, 552, 250]
    assert any(isinstance(e, ev.BodyAborted) for e in run.events)


def test_replies_leave_one_by_one_and_the_decision_stays_open() -> None:
    conn = ServerConnection(LMTP)
    conn.greet()
    conn.receive_data(LHLO + b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\n")
    conn.receive_data(b"DATA\r\nhi\r\n.\r\nNOOP\r\n")
    while not isinstance(event := conn.next_event(), ev.LmtpBodyEnd):
        assert not isinstance(event, Wait)
        if isinstance(event, ev.Decision):
            conn.accept()
    conn.data_to_send()
    assert conn.replies_due == 2 and conn.state is State.BODY_END
    conn.respond(Reply(452, "mailbox full", "4.2.2"))
    assert conn.data_to_send() == b"452 4.2.2 mailbox full\r\n"
    assert conn.awaiting_decision and conn.replies_due == 1
    assert conn.next_event() is Wait.PAUSED  # NOOP waits for the last recipient's reply
    conn.respond(Reply(250, "Ok", "2.0.0"))
    assert conn.state is State.READY and not conn.in_transaction
    assert conn.error_count == 0  # our verdicts on our mailboxes are not the client's errors
    while not isinstance(conn.next_event(), Wait):
        pass
    assert conn.data_to_send() == b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n"


# ------------------------------------------------------------------------------------ client


def client() -> tuple[ClientConnection, list[object]]:
    conn = ClientConnection("mta.test", starttls=StartTLSPolicy.NEVER, lmtp=True)
    return conn, []


def feed(conn: ClientConnection, data: bytes, bytewise: bool) -> list[object]:
    events: list[object] = []
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    for chunk in chunks:
        conn.receive_data(chunk)
        while not isinstance(event := conn.next_event(), Wait | Closed):
            events.append(event)
    return events


def spec(*addresses: str) -> MailTransaction:
    return MailTransaction("a@x.test", tuple(RecipientSpec(a) for a in addresses))


@pytest.mark.parametrize("bytewise", [False, True])
def test_client_reads_one_reply_per_accepted_recipient(bytewise: bool) -> None:
    conn, _ = client()
    feed(conn, b"220 store.test LMTP\r\n", bytewise)
    assert conn.data_to_send() == b"LHLO mta.test\r\n"
    assert conn.phase is Phase.LHLO
    feed(conn, b"250-store.test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n", bytewise)
    assert conn.phase is Phase.READY
    conn.start(spec("b@y.test", "no@y.test", "c@y.test", "d@y.test"))
    assert conn.data_to_send() == (
        b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<no@y.test>\r\n"
        b"RCPT TO:<c@y.test>\r\nRCPT TO:<d@y.test>\r\nDATA\r\n"
    )
    events = feed(
        conn,
        b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 no such user\r\n250 2.1.5 Ok\r\n"
        b"250 2.1.5 Ok\r\n354 go\r\n",
        bytewise,
    )
    assert events == [SendBody()]
    conn.send_body(b"Subject: x\n\nhi\n")
    conn.end_body()
    assert conn.data_to_send().endswith(b"hi\r\n.\r\n")
    assert feed(conn, b"250 2.0.0 b delivered\r\n452 4.2.2 c over quota\r\n", bytewise) == []
    assert conn.phase is Phase.DATA_END  # one more reply is due
    [done] = feed(conn, b"550 5.7.1 d rejected by sieve\r\n", bytewise)
    assert isinstance(done, TransactionDone)
    assert done.results == {
        "b@y.test": Reply(250, "b delivered", "2.0.0"),
        "no@y.test": Reply(550, "no such user", "5.1.1"),
        "c@y.test": Reply(452, "c over quota", "4.2.2"),
        "d@y.test": Reply(550, "d rejected by sieve", "5.7.1"),
    }
    assert done.results["c@y.test"].answered == "end of DATA"
    assert conn.phase is Phase.READY


def test_client_keeps_the_replies_it_got_when_the_connection_breaks() -> None:
    conn, _ = client()
    feed(conn, b"220 store.test LMTP\r\n", False)
    feed(conn, b"250-store.test\r\n250 PIPELINING\r\n", False)
    conn.start(spec("b@y.test", "c@y.test"))
    feed(conn, b"250 Ok\r\n250 Ok\r\n250 Ok\r\n354 go\r\n", False)
    conn.end_body()
    feed(conn, b"250 2.0.0 b delivered\r\n", False)
    [done] = feed(conn, b"", False)
    assert isinstance(done, TransactionDone)
    assert done.results["b@y.test"].code == 250
    assert done.results["c@y.test"].code == 421  # unknown: retried, so never lost


def test_client_does_not_fall_back_to_helo() -> None:
    conn, _ = client()
    feed(conn, b"220 store.test LMTP\r\n", False)
    conn.data_to_send()
    events = feed(conn, b"500 5.5.1 unknown command\r\n", False)
    assert [type(e) for e in events] == [SessionFailed]
    assert conn.data_to_send() == b"QUIT\r\n"


@pytest.mark.parametrize("pipelining", [True, False])
def test_client_core_against_server_core(pipelining: bool) -> None:
    """The two cores talk LMTP to each other with no I/O at all."""
    settings = ServerSettings(hostname="store.test", lmtp=True, pipelining=pipelining)
    server = ServerConnection(settings)
    conn = ClientConnection("mta.test", starttls=StartTLSPolicy.NEVER, lmtp=True)
    server.greet()
    verdicts = {"b@y.test": Reply(250, "Ok: saved", "2.0.0"), "c@y.test": Reply(452, "full", "4.2.2")}
    results = None
    for _ in range(100):
        conn.receive_data(server.data_to_send())
        while not isinstance(event := conn.next_event(), Wait):
            if isinstance(event, SendBody):
                conn.send_body(b"Subject: hi\r\n\r\nbody\r\n")
                conn.end_body()
            elif isinstance(event, TransactionDone):
                results = event.results
                conn.quit()
        if conn.phase is Phase.READY and results is None and conn.next_event() is Wait.PAUSED:
            conn.start(spec("b@y.test", "no@y.test", "c@y.test"))
        server.receive_data(conn.data_to_send())
        while not isinstance(sevent := server.next_event(), Wait):
            match sevent:
                case ev.RcptTo(address="no@y.test"):
                    server.respond(Reply(550, "no such user", "5.1.1"))
                case ev.LmtpBodyEnd():
                    for rcpt in sevent.recipients:
                        server.respond(verdicts[rcpt.address])
                case ev.Hello() | ev.MailFrom() | ev.RcptTo():
                    server.accept()
        if server.closed:
            break
    assert results == {
        "b@y.test": Reply(250, "Ok: saved", "2.0.0"),
        "no@y.test": Reply(550, "no such user", "5.1.1"),
        "c@y.test": Reply(452, "full", "4.2.2"),
    }


def test_help_lists_lhlo_not_helo() -> None:
    run = both(b"HELP\r\nHELP EHLO\r\n")
    listing = run.text().split("\r\n")[2]
    assert "LHLO" in listing.split() and "EHLO" not in listing.split()
    assert "not available here: this is LMTP: use LHLO" in run.text()
    smtp = converse(b"HELP\r\n", settings=ServerSettings(hostname="mx.test"))
    assert "LHLO" not in smtp.text()
