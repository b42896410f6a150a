"""The SMTP client core without an event loop: every server input fed whole, then byte by byte."""

from __future__ import annotations

import base64
import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailhaven.proto.envelope import Envelope, RecipientSpec
from mailhaven.proto.replies import Reply
from mailhaven.proto.smtp_client import (
    NEED_DATA,
    PAUSED,
    TRANSITIONS,
    Capabilities,
    ClientConnection,
    Closed,
    Credentials,
    Event,
    MailTransaction,
    Phase,
    Ready,
    ReplyError,
    ReplyReader,
    SendBody,
    SessionFailed,
    StartTLS,
    StartTLSPolicy,
    Timeouts,
    TransactionDone,
    UsageError,
    Wait,
    utf8_addr_xtext,
)

EHLO_BASIC = b"250-mx.example.org\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
EHLO_PIPE = b"250-mx.example.org\r\n250-PIPELINING\r\n250 SIZE\r\n"


def phase(conn: ClientConnection) -> Phase:
    """Read through a call, so that mypy does not narrow the property between steps."""
    return conn.phase


class Dialogue:
    """Plays the server: feeds bytes to the core and collects the events they cause."""

    def __init__(self, conn: ClientConnection, bytewise: bool) -> None:
        self.conn = conn
        self.bytewise = bytewise

    def server(self, data: bytes) -> list[Event]:
        chunks = [data[i : i + 1] for i in range(len(data))] if self.bytewise and data else [data]
        events: list[Event] = []
        for chunk in chunks:
            self.conn.receive_data(chunk)
            events += self.drain()
        return events

    def drain(self) -> list[Event]:
        events: list[Event] = []
        while True:
            event = self.conn.next_event()
            if isinstance(event, Wait):
                return events
            events.append(event)
            if isinstance(event, Closed):
                return events

    def client(self) -> bytes:
        return self.conn.data_to_send()


def session(
    bytewise: bool, ehlo: bytes = EHLO_BASIC, **kwargs: object
) -> tuple[Dialogue, Capabilities]:
    conn = ClientConnection("client.example.com", starttls=StartTLSPolicy.NEVER, **kwargs)  # type: ignore[arg-type]
    d = Dialogue(conn, bytewise)
    assert phase(conn) is Phase.GREETING
    assert d.server(b"220 mx.example.org ESMTP\r\n") == []
    assert d.client() == b"EHLO client.example.com\r\n"
    [ready] = d.server(ehlo)
    assert isinstance(ready, Ready)
    assert phase(conn) is Phase.READY
    return d, ready.capabilities


def txn(*rcpts: str, **kwargs: object) -> MailTransaction:
    return MailTransaction("a@example.com", tuple(RecipientSpec(r) for r in rcpts), **kwargs)  # type: ignore[arg-type]


def send_body(d: Dialogue, *chunks: bytes) -> bytes:
    for chunk in chunks:
        d.conn.send_body(chunk)
    d.conn.end_body()
    return d.client()


def test_full_transaction_with_mixed_results(bytewise: bool) -> None:
    d, caps = session(bytewise)
    assert caps.size == 1000 and caps.has("8BITMIME") and not caps.has("PIPELINING")
    d.conn.start(txn("ok@x.org", "later@x.org", "never@x.org", size=10, body_8bit=True))
    assert d.drain() == []
    assert d.client() == b"MAIL FROM:<a@example.com> SIZE=10 BODY=8BITMIME\r\n"
    assert phase(d.conn) is Phase.MAIL
    assert d.server(b"250 2.1.0 Ok\r\n") == []
    assert d.client() == b"RCPT TO:<ok@x.org>\r\n"
    d.server(b"250 2.1.5 Ok\r\n")
    assert d.client() == b"RCPT TO:<later@x.org>\r\n"
    d.server(b"450 4.2.0 greylisted\r\n")
    assert d.client() == b"RCPT TO:<never@x.org>\r\n"
    d.server(b"550 5.1.1 no such user\r\n")
    assert d.client() == b"DATA\r\n"
    assert phase(d.conn) is Phase.DATA_INIT
    assert d.server(b"354 go ahead\r\n") == [SendBody()]
    assert phase(d.conn) is Phase.DATA_BLOCK
    assert d.conn.next_event() is PAUSED
    assert send_body(d, b"Subject: hi\n\nbody\n") == b"Subject: hi\r\n\r\nbody\r\n.\r\n"
    assert phase(d.conn) is Phase.DATA_END
    [done] = d.server(b"250 2.0.0 queued as X1\r\n")
    assert isinstance(done, TransactionDone)
    assert done.results == {
        "ok@x.org": Reply(250, "queued as X1", "2.0.0"),
        "later@x.org": Reply(450, "greylisted", "4.2.0"),
        "never@x.org": Reply(550, "no such user", "5.1.1"),
    }
    assert phase(d.conn) is Phase.READY
    d.conn.quit()
    assert d.client() == b"QUIT\r\n"
    assert d.server(b"221 2.0.0 bye\r\n") == [Closed()]
    assert phase(d.conn) is Phase.CLOSED


def test_pipelining_sends_one_group_and_matches_replies_in_order(bytewise: bool) -> None:
    d, caps = session(bytewise, EHLO_PIPE)
    assert caps.size == 0 and caps.has("PIPELINING")
    d.conn.start(txn("a@x.org", "b@x.org", "c@x.org", size=123))
    assert d.client() == (
        b"MAIL FROM:<a@example.com> SIZE=123\r\n"
        b"RCPT TO:<a@x.org>\r\nRCPT TO:<b@x.org>\r\nRCPT TO:<c@x.org>\r\nDATA\r\n"
    )
    replies = b"250 ok\r\n250 ok\r\n450 4.7.1 later\r\n550 5.1.1 unknown\r\n354 go\r\n"
    assert d.server(replies) == [SendBody()]
    assert send_body(d, b"x") == b"x\r\n.\r\n"
    [done] = d.server(b"250 2.0.0 ok\r\n")
    assert isinstance(done, TransactionDone)
    assert [r.code for r in done.results.values()] == [250, 450, 550]


def test_pipelined_mail_failure_applies_to_all_and_no_rset(bytewise: bool) -> None:
    d, _ = session(bytewise, EHLO_PIPE)
    d.conn.start(txn("a@x.org", "b@x.org"))
    d.client()
    [done] = d.server(b"553 5.7.1 sender rejected\r\n503 5.5.1 no\r\n503 5.5.1 no\r\n503 no\r\n")
    assert isinstance(done, TransactionDone)
    assert set(done.results.values()) == {Reply(553, "sender rejected", "5.7.1")}
    assert phase(d.conn) is Phase.READY and d.client() == b""


def test_pipelined_354_without_recipients_sends_only_the_dot(bytewise: bool) -> None:
    d, _ = session(bytewise, EHLO_PIPE)
    d.conn.start(txn("a@x.org"))
    d.client()
    assert d.server(b"250 ok\r\n550 5.1.1 unknown\r\n354 go\r\n") == []
    assert d.client() == b".\r\n"  # RFC 2920 §3.1
    [done] = d.server(b"554 5.5.1 no valid recipients\r\n")
    assert isinstance(done, TransactionDone)
    assert done.results == {"a@x.org": Reply(550, "unknown", "5.1.1")}


def test_all_recipients_rejected_then_rset_then_reuse(bytewise: bool) -> None:
    d, _ = session(bytewise)
    d.conn.start(txn("a@x.org"))
    d.client()
    d.server(b"250 ok\r\n")
    d.client()
    [done] = d.server(b"550 5.1.1 unknown\r\n")
    assert isinstance(done, TransactionDone)
    assert d.client() == b"RSET\r\n"
    assert phase(d.conn) is Phase.RSET
    [ready] = d.server(b"250 2.0.0 ok\r\n")
    assert isinstance(ready, Ready)
    d.conn.start(txn("b@x.org"))
    assert d.client() == b"MAIL FROM:<a@example.com>\r\n"


def test_mail_failure_without_pipelining(bytewise: bool) -> None:
    d, _ = session(bytewise)
    d.conn.start(txn("a@x.org", "b@x.org"))
    d.client()
    [done] = d.server(b"451 4.3.0 try later\r\n")
    assert isinstance(done, TransactionDone)
    assert set(done.results.values()) == {Reply(451, "try later", "4.3.0")}
    assert d.client() == b"" and phase(d.conn) is Phase.READY


def test_data_rejected_applies_to_accepted_recipients(bytewise: bool) -> None:
    d, _ = session(bytewise)
    d.conn.start(txn("a@x.org"))
    d.server(b"250 ok\r\n")
    d.server(b"250 ok\r\n")
    [done] = d.server(b"554 5.7.1 no data for you\r\n")
    assert isinstance(done, TransactionDone)
    assert done.results["a@x.org"].code == 554
    assert d.client().endswith(b"DATA\r\nRSET\r\n")


@pytest.mark.parametrize("pipelining", [False, True])
def test_2xx_to_data_is_a_protocol_error_not_a_delivery(bytewise: bool, pipelining: bool) -> None:
    # Found by the protocol fuzzer: a 250 to DATA (instead of 354) was taken as the final
    # reply, so the accepted recipients were reported delivered though no body was ever sent.
    d, _ = session(bytewise, EHLO_PIPE if pipelining else EHLO_BASIC)
    d.conn.start(txn("a@x.org", "b@x.org"))
    d.server(b"250 ok\r\n")
    d.server(b"250 ok\r\n550 5.1.1 unknown\r\n")
    done, closed = d.server(b"250 2.0.0 Ok\r\n")
    assert isinstance(done, TransactionDone) and closed == Closed()
    sent = done.results["a@x.org"]
    assert sent.is_temporary and sent.enhanced == "4.5.0", sent
    assert "250 2.0.0 Ok" in sent.text
    assert done.results["b@x.org"].code == 550
    assert d.client().endswith(b"DATA\r\n")  # nothing more: the peer's state is unknown


def test_size_refusal_sends_nothing() -> None:
    d, _ = session(False)
    d.conn.start(txn("a@x.org", "b@x.org", size=1001))
    [done] = d.drain()
    assert isinstance(done, TransactionDone)
    assert {r.code for r in done.results.values()} == {552}
    assert {r.enhanced for r in done.results.values()} == {"5.3.4"}
    assert d.client() == b"" and phase(d.conn) is Phase.READY


@pytest.mark.parametrize(
    "message",
    [
        txn("a@x.org", smtputf8=True),
        txn("rené@x.org"),
        MailTransaction("rené@example.com", (RecipientSpec("a@x.org"),)),
    ],
)
def test_smtputf8_refusal(message: MailTransaction) -> None:
    d, _ = session(False)
    d.conn.start(message)
    [done] = d.drain()
    assert isinstance(done, TransactionDone)
    assert [(r.code, r.enhanced) for r in done.results.values()] == [(550, "5.6.7")]
    assert d.client() == b""


def test_smtputf8_offered_is_used() -> None:
    d, _ = session(False, b"250-x\r\n250-SMTPUTF8\r\n250 PIPELINING\r\n")
    d.conn.start(txn("rené@x.org"))
    assert (
        d.client()
        == "MAIL FROM:<a@example.com> SMTPUTF8\r\nRCPT TO:<rené@x.org>\r\nDATA\r\n".encode()
    )


def test_crlf_in_addresses_never_reaches_the_wire() -> None:
    d, _ = session(False)
    d.conn.start(txn("ok@x.org", "evil@x.org>\r\nRCPT TO:<victim@y.org"))
    assert d.client() == b"MAIL FROM:<a@example.com>\r\n"
    d.server(b"250 ok\r\n")
    assert d.client() == b"RCPT TO:<ok@x.org>\r\n"
    [done] = d.server(b"550 no\r\n")
    assert isinstance(done, TransactionDone)
    assert done.results["evil@x.org>\r\nRCPT TO:<victim@y.org"].enhanced == "5.1.3"
    assert done.results["ok@x.org"].code == 550

    d2, _ = session(False)
    d2.conn.start(MailTransaction("a@x\r\nDATA", (RecipientSpec("b@x.org"),)))
    [done] = d2.drain()
    assert isinstance(done, TransactionDone)
    assert done.results["b@x.org"].enhanced == "5.1.7"
    assert d2.client() == b""


def test_dsn_parameters_when_offered() -> None:
    d, _ = session(False, b"250-x\r\n250-DSN\r\n250 PIPELINING\r\n")
    spec = RecipientSpec("b@x.org", notify=("success", "FAILURE"), orcpt=("rfc822", "B+1=x@x.org"))
    utf = RecipientSpec("c@x.org", orcpt=("rfc822", "rené@x.org"))
    d.conn.start(MailTransaction("a@x.org", (spec, utf), dsn_ret="hdrs", dsn_envid="id 1+"))
    assert d.client() == (
        b"MAIL FROM:<a@x.org> RET=HDRS ENVID=id+201+2B\r\n"
        b"RCPT TO:<b@x.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;B+2B1+3Dx@x.org\r\n"
        b"RCPT TO:<c@x.org> ORCPT=utf-8;ren\\x{E9}@x.org\r\n"
        b"DATA\r\n"
    )


def test_dsn_parameters_omitted_when_not_offered() -> None:
    d, _ = session(False)
    spec = RecipientSpec("b@x.org", notify=("NEVER",), orcpt=("rfc822", "b@x.org"))
    d.conn.start(MailTransaction("", (spec,), dsn_ret="FULL", dsn_envid="x"))
    assert d.client() == b"MAIL FROM:<>\r\n"
    d.server(b"250 ok\r\n")
    assert d.client() == b"RCPT TO:<b@x.org>\r\n"


BODIES = [
    # (stored, wire) -- the wire form ends with the terminating ".\r\n"
    (b"", b".\r\n"),
    (b".\n", b"..\r\n.\r\n"),
    (b"a\n.\nb\n", b"a\r\n..\r\nb\r\n.\r\n"),
    (b"a\r\n.\r\n", b"a\r\n..\r\n.\r\n"),
    (b"..x\n", b"...x\r\n.\r\n"),
    (b"no final newline", b"no final newline\r\n.\r\n"),
    (b"bare\rcr\r.\rx", b"bare\r\ncr\r\n..\r\nx\r\n.\r\n"),
    (b"smuggle\n.\r\nMAIL", b"smuggle\r\n..\r\nMAIL\r\n.\r\n"),
    (b"ends in cr\r", b"ends in cr\r\n.\r\n"),
    (b"8bit \xe9\xff\x00 kept\n", b"8bit \xe9\xff\x00 kept\r\n.\r\n"),
]


@pytest.mark.parametrize(("stored", "wire"), BODIES)
def test_body_framing_for_every_split(stored: bytes, wire: bytes) -> None:
    splits = [(stored,), tuple(stored[i : i + 1] for i in range(len(stored)))]
    splits += [(stored[:i], stored[i:]) for i in range(len(stored) + 1)]
    splits += [
        (stored[:i], stored[i:j], stored[j:])
        for i, j in itertools.combinations(range(len(stored) + 1), 2)
    ]
    for chunks in splits:
        d, _ = session(False)
        d.conn.start(txn("a@x.org"))
        d.server(b"250 ok\r\n250 ok\r\n")
        d.server(b"354 go\r\n")
        d.client()
        assert send_body(d, *chunks) == wire, chunks


def test_helo_fallback(bytewise: bool) -> None:
    conn = ClientConnection("client.example.com", starttls=StartTLSPolicy.OPPORTUNISTIC)
    d = Dialogue(conn, bytewise)
    d.server(b"220 old.example.org SMTP\r\n")
    d.client()
    assert d.server(b"502 5.5.2 what?\r\n") == []
    assert d.client() == b"HELO client.example.com\r\n"
    assert phase(conn) is Phase.HELO
    [ready] = d.server(b"250 old.example.org\r\n")
    assert ready == Ready(Capabilities())  # no STARTTLS without EHLO


def test_ehlo_4xx_fails_the_session(bytewise: bool) -> None:
    conn = ClientConnection("c.example", starttls=StartTLSPolicy.NEVER)
    d = Dialogue(conn, bytewise)
    d.server(b"220 hi\r\n")
    [failed] = d.server(b"450 4.3.2 busy\r\n")
    assert failed == SessionFailed(Reply(450, "busy", "4.3.2"), Phase.EHLO)
    assert d.client() == b"EHLO c.example\r\nQUIT\r\n"
    assert d.server(b"221 bye\r\n") == [Closed()]


@pytest.mark.parametrize("greeting", [b"554 5.7.1 go away\r\n", b"421 4.3.2 too busy\r\n"])
def test_greeting_refusal(bytewise: bool, greeting: bytes) -> None:
    conn = ClientConnection("c.example")
    d = Dialogue(conn, bytewise)
    events = d.server(greeting)
    assert isinstance(events[0], SessionFailed) and events[0].phase is Phase.GREETING
    if greeting.startswith(b"421"):  # the peer is closing: no QUIT
        assert events[1:] == [Closed()] and d.client() == b""
    else:
        assert d.client() == b"QUIT\r\n"


def test_multiline_greeting_and_reply_parsing(bytewise: bool) -> None:
    conn = ClientConnection("c.example", starttls=StartTLSPolicy.NEVER)
    d = Dialogue(conn, bytewise)
    assert d.server(b"220-first\r\n220-second\n220 third\r\n") == []
    assert d.client() == b"EHLO c.example\r\n"


def test_starttls_discards_injected_plaintext(bytewise: bool) -> None:
    conn = ClientConnection("c.example", starttls=StartTLSPolicy.REQUIRED)
    d = Dialogue(conn, bytewise)
    d.server(b"220 hi\r\n")
    d.client()
    d.server(b"250-x\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n")
    assert d.client() == b"STARTTLS\r\n"
    # A man in the middle appends a fake EHLO reply after the 220: it must never be read.
    assert d.server(b"220 2.0.0 go\r\n250-x\r\n250 AUTH PLAIN\r\n") == [StartTLS()]
    assert phase(conn) is Phase.TLS_HANDSHAKE
    d.server(b"250 more clear text\r\n")
    conn.tls_started()
    assert conn.tls_active and d.client() == b"EHLO c.example\r\n"
    [ready] = d.server(b"250-x\r\n250-STARTTLS\r\n250 PIPELINING\r\n")
    assert isinstance(ready, Ready) and ready.capabilities.has("PIPELINING")
    assert d.client() == b""  # no second STARTTLS


def test_starttls_required_but_not_offered() -> None:
    d, _ = session(False)  # NEVER: sanity
    conn = ClientConnection("c.example", starttls=StartTLSPolicy.REQUIRED)
    d = Dialogue(conn, False)
    d.server(b"220 hi\r\n")
    [failed] = d.server(b"250 x\r\n")
    assert isinstance(failed, SessionFailed) and failed.reply.enhanced == "4.7.4"
    assert d.client().endswith(b"QUIT\r\n")


def test_starttls_refused_opportunistic_continues_in_clear() -> None:
    conn = ClientConnection("c.example", starttls=StartTLSPolicy.OPPORTUNISTIC)
    d = Dialogue(conn, False)
    d.server(b"220 hi\r\n250-x\r\n250 STARTTLS\r\n")
    assert d.client().endswith(b"STARTTLS\r\n")
    [ready] = d.server(b"454 4.7.0 TLS not available\r\n")
    assert isinstance(ready, Ready) and not conn.tls_active


def test_tls_handshake_failure() -> None:
    conn = ClientConnection("c.example", starttls=StartTLSPolicy.REQUIRED)
    d = Dialogue(conn, False)
    d.server(b"220 hi\r\n250-x\r\n250 STARTTLS\r\n")
    assert d.server(b"220 go\r\n") == [StartTLS()]
    conn.tls_failed("certificate verify failed")
    [failed, closed] = d.drain()
    assert isinstance(failed, SessionFailed) and failed.reply.enhanced == "4.7.5"
    assert closed == Closed()


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


def test_auth_plain(bytewise: bool) -> None:
    creds = Credentials("user", "sécret")
    assert "sécret" not in repr(creds)
    conn = ClientConnection("c.example", credentials=creds, tls_active=True)
    d = Dialogue(conn, bytewise)
    d.server(b"220 hi\r\n")
    d.client()
    assert d.server(b"250-x\r\n250 AUTH=LOGIN PLAIN\r\n") == []
    assert d.client() == b"AUTH PLAIN " + b64("\0user\0sécret") + b"\r\n"
    [ready] = d.server(b"235 2.7.0 ok\r\n")
    assert isinstance(ready, Ready) and conn.authenticated


def test_auth_login_and_failure(bytewise: bool) -> None:
    conn = ClientConnection(
        "c.example", credentials=Credentials("u", "p"), allow_plaintext_auth=True
    )
    d = Dialogue(conn, bytewise)
    d.server(b"220 hi\r\n250-x\r\n250 AUTH LOGIN\r\n")
    assert d.client().endswith(b"AUTH LOGIN\r\n")
    d.server(b"334 VXNlcm5hbWU6\r\n")
    assert d.client() == b64("u") + b"\r\n"
    d.server(b"334 UGFzc3dvcmQ6\r\n")
    assert d.client() == b64("p") + b"\r\n"
    [failed] = d.server(b"535 5.7.8 bad credentials\r\n")
    # soft bounce, like Postfix: refused credentials defer the mail instead of bouncing it
    said = "SASL authentication failed; server said: 535 5.7.8 bad credentials"
    assert failed == SessionFailed(Reply(454, said, "4.7.8"), Phase.AUTH)


def test_auth_refused_without_tls() -> None:
    conn = ClientConnection(
        "c.example", starttls=StartTLSPolicy.NEVER, credentials=Credentials("u", "p")
    )
    d = Dialogue(conn, False)
    d.server(b"220 hi\r\n")
    [failed] = d.server(b"250-x\r\n250 AUTH PLAIN\r\n")
    assert isinstance(failed, SessionFailed) and failed.reply.is_temporary
    assert b"AUTH" not in d.client()


def test_421_during_rcpt_ends_everything(bytewise: bool) -> None:
    d, _ = session(bytewise)
    d.conn.start(txn("a@x.org", "b@x.org"))
    d.server(b"250 ok\r\n")
    d.server(b"250 ok\r\n")
    events = d.server(b"421 4.4.2 timeout\r\n")
    assert isinstance(events[0], TransactionDone)
    assert {r.code for r in events[0].results.values()} == {421}
    assert events[1:] == [Closed()]


def test_lost_connection_after_end_of_data(bytewise: bool) -> None:
    d, _ = session(bytewise)
    d.conn.start(txn("a@x.org", "b@x.org"))
    d.server(b"250 ok\r\n250 ok\r\n550 no\r\n354 go\r\n")
    send_body(d, b"hi\n")
    events = d.server(b"")
    done = events[0]
    assert isinstance(done, TransactionDone)
    assert done.results["a@x.org"].code == 421 and done.results["a@x.org"].enhanced == "4.4.2"
    assert "end of data" in done.results["a@x.org"].text
    assert done.results["b@x.org"].code == 550
    assert events[1:] == [Closed()]


def test_adapter_timeout_in_greeting() -> None:
    conn = ClientConnection("c.example")
    conn.connection_lost("timed out")
    failed = conn.next_event()
    assert isinstance(failed, SessionFailed) and failed.phase is Phase.GREETING
    assert "timed out" in failed.reply.text and failed.reply.is_temporary
    assert conn.next_event() == Closed()


def test_protocol_errors_become_temporary_failures() -> None:
    conn = ClientConnection("c.example")
    conn.receive_data(b"HTTP/1.1 400 Bad Request\r\n")
    failed = conn.next_event()
    assert isinstance(failed, SessionFailed) and failed.reply.enhanced == "4.5.0"


def test_usage_errors() -> None:
    conn = ClientConnection("c.example")
    assert conn.next_event() is NEED_DATA
    with pytest.raises(UsageError):
        conn.start(txn("a@x.org"))
    with pytest.raises(ValueError):
        ClientConnection("bad name\r\n")


def test_from_envelope() -> None:
    env = Envelope(
        "s@x.org",
        (RecipientSpec("a@y.org", notify=("NEVER",)), RecipientSpec("b@y.org")),
        body_type="8BITMIME",
        dsn_ret="FULL",
    )
    t = MailTransaction.from_envelope(env, ("a@y.org", "c@y.org"), 42)
    assert t.recipients == (RecipientSpec("a@y.org", notify=("NEVER",)), RecipientSpec("c@y.org"))
    assert t.body_8bit and t.size == 42 and t.dsn_ret == "FULL"


# -- pieces --------------------------------------------------------------------------------


def read_all(data: bytes) -> list[Reply]:
    reader = ReplyReader()
    reader.feed(data)
    out = []
    while (r := reader.next_reply()) is not None:
        out.append(r)
    return out


def test_reply_reader_multiline_and_enhanced() -> None:
    [r] = read_all(b"550-5.1.1 first\r\n550-5.1.1 second\r\n550 5.1.1 third\r\n")
    assert r == Reply(550, "first", "5.1.1", ("second", "third"))
    assert read_all(r.to_bytes()) == [r]
    [r] = read_all(b"250 2.5.0\r\n")
    assert r == Reply(250, "", "2.5.0")
    [r] = read_all(b"250 4.1.1 class mismatch is text\r\n")
    assert r.enhanced is None and r.text == "4.1.1 class mismatch is text"
    [r] = read_all(b"354\r\n")
    assert r == Reply(354, "")


@pytest.mark.parametrize(
    "bad",
    [b"25 short\r\n", b"abc text\r\n", b"650 x\r\n", b"250_x\r\n", b"250-a\r\n251 b\r\n",
     b"250 " + b"x" * 3000, b"250-x\r\n" * 101,
     # a code cut short: found by the protocol fuzzer (it became Reply(25), neither 2xx nor 5xx)
     b"25\r\n", b"2\n", b"55\r\n"],
)  # fmt: skip
def test_reply_reader_rejects(bad: bytes) -> None:
    with pytest.raises(ReplyError):
        read_all(bad)


def test_capabilities() -> None:
    caps = Capabilities.from_ehlo(
        Reply(250, "mx", None, ("size 52428800", "AUTH PLAIN login", "starttls", "CHUNKING"))
    )
    assert caps.size == 52428800 and caps.auth == {"PLAIN", "LOGIN"}
    assert caps.has("STARTTLS") and caps.has("CHUNKING") and not caps.has("DSN")


def test_utf8_addr_xtext() -> None:
    assert utf8_addr_xtext("a+\\é") == "a\\x{2B}\\x{5C}\\x{E9}"


def test_transition_table_is_complete() -> None:
    assert set(TRANSITIONS) == set(Phase)
    assert TRANSITIONS[Phase.CLOSED] == frozenset()
    assert all(Phase.CLOSED in t for p, t in TRANSITIONS.items() if p is not Phase.CLOSED)


def test_timeouts_follow_rfc5321() -> None:
    t = Timeouts()
    assert t.for_phase(Phase.GREETING) == 300 and t.for_phase(Phase.MAIL) == 300
    assert t.for_phase(Phase.RCPT) == 300 and t.for_phase(Phase.DATA_INIT) == 120
    assert t.for_phase(Phase.DATA_BLOCK) == 180 and t.for_phase(Phase.DATA_END) == 600
    assert all(t.for_phase(p) > 0 for p in Phase)


# -- properties ------------------------------------------------------------------------------

_FRAGMENTS = st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b".."]), max_size=40)


@given(_FRAGMENTS, st.lists(st.integers(0, 80), max_size=5))
def test_body_framing_property(fragments: list[bytes], cuts: list[int]) -> None:
    """Whatever the stored bytes and chunking, a strict receiver gets them back exactly."""
    stored = b"".join(fragments)
    points = sorted({min(c, len(stored)) for c in cuts})
    chunks = [stored[i:j] for i, j in zip([0, *points], [*points, len(stored)], strict=True)]
    d, _ = session(False)
    d.conn.start(txn("a@x.org"))
    d.server(b"250 ok\r\n250 ok\r\n354 go\r\n")
    d.client()
    wire = send_body(d, *chunks)
    lines = wire.split(b"\r\n")
    assert lines[-2:] == [b".", b""]
    assert all(b"\r" not in line and b"\n" not in line for line in lines)
    assert b"." not in lines[:-2]  # nothing ends the data early
    received = b"".join(line[1:] + b"\r\n" if line.startswith(b".") else line + b"\r\n"
                        for line in lines[:-2])  # fmt: skip
    normal = re.sub(rb"\r\n|\r|\n", b"\r\n", stored)
    assert received == (normal if normal.endswith(b"\r\n") or not normal else normal + b"\r\n")


_CODES = st.sampled_from([220, 221, 235, 250, 334, 354, 421, 450, 451, 500, 502, 535, 550, 554])


@settings(max_examples=300)
@given(st.lists(_CODES, max_size=40), st.booleans(), st.booleans())
def test_random_replies_never_break_the_machine(
    codes: list[int], pipelining: bool, tls: bool
) -> None:
    conn = ClientConnection(
        "c.example",
        starttls=StartTLSPolicy.OPPORTUNISTIC if tls else StartTLSPolicy.NEVER,
        credentials=Credentials("u", "p"),
        allow_plaintext_auth=True,
    )
    caps = b"250-x\r\n250-STARTTLS\r\n250-AUTH LOGIN\r\n250-SIZE 100\r\n"
    caps += b"250 PIPELINING\r\n" if pipelining else b"250 DSN\r\n"
    starts = 0
    for code in codes:
        if conn.phase is Phase.CLOSED:
            break
        ehlo = code == 250 and conn.phase is Phase.EHLO
        conn.receive_data(caps if ehlo else f"{code} text\r\n".encode())
        while True:
            event = conn.next_event()
            if event is NEED_DATA or isinstance(event, Closed):
                break
            if isinstance(event, TransactionDone):
                assert set(event.results) <= {"a@x.org", "b@x.org"}
                assert all(200 <= r.code < 600 for r in event.results.values())
            if event is not PAUSED:
                continue
            if conn.phase is Phase.TLS_HANDSHAKE:
                conn.tls_started()
            elif conn.phase is Phase.DATA_BLOCK:
                conn.send_body(b"x\n.\n")
                conn.end_body()
            elif starts < 3:
                starts += 1
                conn.start(txn("a@x.org", "b@x.org", size=50 * starts))
            else:
                conn.quit()
                break
        conn.data_to_send()


def test_peer_replies_say_what_they_answered(bytewise: bool) -> None:
    """`Reply.answered` marks the peer's words; what the core makes up has none."""
    d, _ = session(bytewise)
    d.conn.start(txn("ok@x.org", "no@x.org", "bad\r\n@x.org"))
    d.server(b"250 2.1.0 Ok\r\n")
    d.server(b"250 2.1.5 Ok\r\n")
    d.server(b"550 5.1.1 no such user\r\n")
    d.server(b"354 go\r\n")
    send_body(d, b"hi\n")
    [done] = d.server(b"250 2.0.0 queued as X1\r\n")
    assert isinstance(done, TransactionDone)
    assert {a: r.answered for a, r in done.results.items()} == {
        "ok@x.org": "end of DATA",
        "no@x.org": "RCPT TO",
        "bad\r\n@x.org": None,  # refused here, never sent
    }
    d.conn.start(txn("a@x.org"))
    [done] = d.server(b"553 5.7.1 sender rejected\r\n")
    assert isinstance(done, TransactionDone)
    assert done.results["a@x.org"].answered == "MAIL FROM"
    d.conn.start(txn("a@x.org"))
    d.server(b"250 ok\r\n250 ok\r\n")
    done, closed = d.server(b"")
    assert isinstance(done, TransactionDone) and closed == Closed()
    lost = done.results["a@x.org"]
    assert lost.code == 421 and lost.answered is None  # "lost connection": our words


def test_session_failures_say_what_they_answered() -> None:
    greeting = ClientConnection("c.example")
    greeting.receive_data(b"554 5.7.1 go away\r\n")
    failed = greeting.next_event()
    assert isinstance(failed, SessionFailed) and failed.reply.answered == "greeting"
    required = ClientConnection("c.example", starttls=StartTLSPolicy.REQUIRED)
    required.receive_data(b"220 hi\r\n250 mx.example\r\n")
    failed = required.next_event()
    assert isinstance(failed, SessionFailed) and failed.reply.answered is None  # our decision
