"""The POP3 core without an event loop: transcripts fed whole and one byte at a time."""

from __future__ import annotations

import base64
import itertools
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailhaven.proto import pop3
from mailhaven.proto.pop3 import (
    NEED_DATA,
    BodyEncoder,
    Connection,
    ConnectionClosed,
    CrlfCounter,
    Event,
    RespCode,
    State,
    UsageError,
)

MESSAGE = b"Subject: hi\n\nline1\n.dot\n..two\nlast"
GREETING = b"+OK test ready\r\n"


def app(conn: Connection, event: Event) -> None:
    """A scripted application: one user `alice`/`pw`, a two-message maildrop."""
    match event:
        case pop3.Login(user, password):
            if (user, password) == ("alice", "pw"):
                conn.accept_login()
            else:
                conn.reject_login(RespCode.AUTH, "Authentication failed")
        case pop3.Stat():
            conn.ok("2 40")
        case pop3.ListMessages(None):
            conn.listing("2 messages", ["1 20", "2 20"])
        case pop3.Uidl(None):
            conn.listing("", ["1 .odd-uid", "2 b"])
        case pop3.ListMessages(n) | pop3.Uidl(n) | pop3.Dele(n) if n in (1, 2):
            conn.ok(f"{n} fine")
        case pop3.ListMessages() | pop3.Uidl() | pop3.Dele() | pop3.Retr() | pop3.Top() if (
            event.number not in (1, 2)
        ):
            conn.err("No such message")
        case pop3.Retr() | pop3.Top():
            encoder = conn.message_begin("x octets")
            conn.message_data(encoder, MESSAGE)
            conn.message_end(encoder)
        case pop3.Rset() | pop3.Quit():
            conn.ok("done")
        case pop3.StartTls():
            conn.tls_started()
        case _:
            raise AssertionError(event)


def drive(
    data: bytes,
    *,
    bytewise: bool,
    eof: bool = False,
    answer: Callable[[Connection, Event], None] = app,
    **options: bool,
) -> tuple[bytes, list[Event], Connection]:
    kwargs: dict[str, bool] = {"tls_available": True, "insecure_auth": True, **options}
    conn = Connection("test ready", **kwargs)  # type: ignore[arg-type]
    out = bytearray(conn.data_to_send())
    events: list[Event] = []
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    if eof:
        chunks.append(b"")
    for chunk in chunks:
        if conn.state is State.CLOSED:
            break
        conn.receive_data(chunk)
        while True:
            event = conn.next_event()
            out += conn.data_to_send()
            if event is NEED_DATA:
                break
            events.append(event)
            if isinstance(event, ConnectionClosed):
                return bytes(out), events, conn
            answer(conn, event)
            out += conn.data_to_send()
    return bytes(out), events, conn


def transcript(data: bytes, bytewise: bool, **options: bool) -> bytes:
    """Run the input both ways and insist they agree; return the output."""
    whole = drive(data, bytewise=False, answer=app, **options)[0]
    if bytewise:
        assert drive(data, bytewise=True, answer=app, **options)[0] == whole
    return whole


LOGIN = b"USER alice\r\nPASS pw\r\n"
LOGGED_IN = GREETING + b"+OK\r\n+OK Logged in\r\n"


def test_greeting_and_capa_before_tls(bytewise: bool) -> None:
    out = transcript(b"CAPA\r\n", bytewise, insecure_auth=False)
    assert out == GREETING + (
        b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
        b"PIPELINING\r\nSTLS\r\nIMPLEMENTATION mailhaven\r\n.\r\n"
    )


def test_capa_when_auth_allowed_lists_user_and_sasl(bytewise: bool) -> None:
    out = transcript(b"CAPA\r\n", bytewise, tls_active=True)
    assert b"USER\r\nSASL PLAIN LOGIN\r\n" in out
    assert b"STLS" not in out


def test_plaintext_auth_refused_without_tls(bytewise: bool) -> None:
    out = transcript(LOGIN + b"AUTH PLAIN\r\n", bytewise, insecure_auth=False)
    refused = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connections\r\n"
    assert out == GREETING + refused * 3


def test_full_session(bytewise: bool) -> None:
    data = LOGIN + b"STAT\r\nLIST\r\nLIST 2\r\nUIDL\r\nRETR 1\r\nTOP 2 0\r\nDELE 1\r\nQUIT\r\n"
    out, events, conn = drive(data, bytewise=bytewise)
    body = b"Subject: hi\r\n\r\nline1\r\n..dot\r\n...two\r\nlast\r\n.\r\n"
    assert out == LOGGED_IN + (
        b"+OK 2 40\r\n"
        b"+OK 2 messages\r\n1 20\r\n2 20\r\n.\r\n"
        b"+OK 2 fine\r\n"
        b"+OK\r\n1 .odd-uid\r\n2 b\r\n.\r\n"
        b"+OK x octets\r\n" + body + b"+OK x octets\r\nSubject: hi\r\n\r\n.\r\n"
        b"+OK 1 fine\r\n"
        b"+OK done\r\n"
    )
    assert events[0] == pop3.Login("alice", "pw", "USER")
    assert events[-2:] == [pop3.Quit(), ConnectionClosed()]
    assert conn.state is State.CLOSED


def test_pipelined_commands_answer_in_order() -> None:
    out, events, _ = drive(LOGIN + b"NOOP\r\nSTAT\r\nNOOP\r\nXXXX\r\nSTAT\r\n", bytewise=False)
    assert out == LOGGED_IN + b"+OK\r\n+OK 2 40\r\n+OK\r\n-ERR Unknown command\r\n+OK 2 40\r\n"
    assert [type(e) for e in events] == [pop3.Login, pop3.Stat, pop3.Stat]


def test_bare_lf_and_lower_case_commands(bytewise: bool) -> None:
    out = transcript(b"user alice\npass pw\nstat\n", bytewise)
    assert out == LOGGED_IN + b"+OK 2 40\r\n"


def test_password_may_contain_spaces() -> None:
    _, events, _ = drive(b"USER bob\r\nPASS  a b \r\n", bytewise=False)
    assert events == [pop3.Login("bob", " a b ", "USER")]


def test_wrong_password_then_right(bytewise: bool) -> None:
    out = transcript(b"USER alice\r\nPASS no\r\nUSER alice\r\nPASS pw\r\n", bytewise)
    assert out == GREETING + b"+OK\r\n-ERR [AUTH] Authentication failed\r\n+OK\r\n+OK Logged in\r\n"


def test_three_failed_logins_close(bytewise: bool) -> None:
    out = transcript(b"USER a\r\nPASS x\r\n" * 3 + b"CAPA\r\n", bytewise)
    assert out.count(b"-ERR [AUTH]") == 3
    assert b"Capability" not in out


def test_pass_without_user_and_apop(bytewise: bool) -> None:
    out = transcript(b"PASS pw\r\nAPOP alice 0123456789abcdef\r\n", bytewise)
    assert out == GREETING + b"-ERR No user name given\r\n-ERR APOP is not supported\r\n"


def test_auth_plain_initial_response(bytewise: bool) -> None:
    ir = base64.b64encode(b"\0alice\0pw")
    out, events, _ = drive(b"AUTH PLAIN " + ir + b"\r\nSTAT\r\n", bytewise=bytewise)
    assert out == GREETING + b"+OK Logged in\r\n+OK 2 40\r\n"
    assert events[0] == pop3.Login("alice", "pw", "PLAIN", "")


def test_auth_plain_continuation_and_cancel(bytewise: bool) -> None:
    ir = base64.b64encode(b"alice\0alice\0pw")
    out, events, _ = drive(b"AUTH PLAIN\r\n*\r\nauth plain\r\n" + ir + b"\r\n", bytewise=bytewise)
    assert out == GREETING + b"+ \r\n-ERR Authentication cancelled\r\n+ \r\n+OK Logged in\r\n"
    assert events == [pop3.Login("alice", "pw", "PLAIN", "alice")]


def test_auth_login_mechanism() -> None:
    data = b"AUTH LOGIN\r\n" + base64.b64encode(b"alice") + b"\r\n" + base64.b64encode(b"pw")
    out, _events, _ = drive(data + b"\r\n", bytewise=False)
    assert out == GREETING + b"+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n+OK Logged in\r\n"


def test_auth_errors(bytewise: bool) -> None:
    other = base64.b64encode(b"bob\0alice\0pw")
    data = b"AUTH\r\nAUTH CRAM-MD5\r\nAUTH PLAIN !!!\r\nAUTH PLAIN " + other + b"\r\n"
    out = transcript(data, bytewise)
    assert out == GREETING + (
        b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"
        b"-ERR Unsupported authentication mechanism\r\n"
        b"-ERR Invalid base64 data\r\n"
        b"-ERR [AUTH] Authorization identity not permitted\r\n"
    )


def test_commands_in_wrong_state(bytewise: bool) -> None:
    out = transcript(b"STAT\r\nNOOP\r\n" + LOGIN + b"USER x\r\nSTLS\r\n", bytewise)
    bad = b"-ERR Command not valid in this state\r\n"
    assert out == GREETING + bad * 2 + b"+OK\r\n+OK Logged in\r\n" + bad * 2


def test_bad_arguments(bytewise: bool) -> None:
    data = LOGIN + b"LIST x\r\nRETR\r\nTOP 1\r\nDELE -1\r\nRETR 99999999999\r\nLIST 9\r\n"
    out = transcript(data, bytewise)
    assert out == LOGGED_IN + (
        b"-ERR Invalid argument\r\n-ERR Wrong number of arguments\r\n"
        b"-ERR Wrong number of arguments\r\n-ERR Invalid argument\r\n-ERR Invalid argument\r\n"
        b"-ERR No such message\r\n"
    )


def test_too_many_bad_commands_close(bytewise: bool) -> None:
    out, events, conn = drive(b"BOGUS\r\n" * 20, bytewise=bytewise)
    assert out.count(b"-ERR") == pop3.MAX_BAD_COMMANDS
    assert out.endswith(b"-ERR Too many bad commands, closing connection\r\n")
    assert conn.state is State.CLOSED and events == [ConnectionClosed()]


def test_line_length_limits(bytewise: bool) -> None:
    long_cmd = b"USER " + b"a" * 300 + b"\r\n"
    huge = b"X" * (pop3.MAX_AUTH_LINE + 10) + b"\r\n"
    out = transcript(long_cmd + huge + b"CAPA\r\n", bytewise)
    assert out.startswith(GREETING + b"-ERR Line too long\r\n-ERR Line too long\r\n+OK Capab")


@pytest.mark.parametrize(
    "prefix",
    [b"USER alice\r\nPASS ", b"AUTH PLAIN ", b"AUTH PLAIN\r\n"],
    ids=["pass", "auth", "sasl"],
)
def test_overlong_secret_line_is_refused_however_it_arrives(bytewise: bool, prefix: bytes) -> None:
    # Found by the protocol fuzzer: a PASS line over MAX_AUTH_LINE that arrived in one read
    # became a Login with a 13000-octet password (the same bytes in small reads: "Line too
    # long"); over-long AUTH lines got another error text depending on the reads.
    line = prefix + b"a" * (pop3.MAX_AUTH_LINE + 100) + b"\r\n"
    out = transcript(line + b"CAPA\r\n", bytewise)
    _, events, _ = drive(line, bytewise=bytewise)
    assert events == []
    assert b"-ERR Line too long\r\n+OK Capab" in out


def test_unbounded_line_is_not_buffered() -> None:
    conn = Connection("hi", tls_available=False)
    for _ in range(100):
        conn.receive_data(b"x" * 1000)
        assert conn.next_event() is NEED_DATA
        assert conn.bytes_buffered <= pop3.MAX_AUTH_LINE + 1000


def test_invalid_utf8_and_nul(bytewise: bool) -> None:
    out = transcript(b"USER \xff\r\nUSER a\0b\r\n", bytewise)
    assert out == GREETING + b"-ERR Invalid UTF-8 in command\r\n-ERR NUL character in command\r\n"


def test_quit_in_authorization_closes(bytewise: bool) -> None:
    out, events, conn = drive(b"QUIT\r\nCAPA\r\n", bytewise=bytewise)
    assert out == GREETING + b"+OK Logging out\r\n"
    assert events == [ConnectionClosed()] and conn.state is State.CLOSED


def test_quit_in_transaction_enters_update_then_closes() -> None:
    seen: list[State] = []

    def answer(conn: Connection, event: Event) -> None:
        if isinstance(event, pop3.Quit):
            seen.append(conn.state)
            conn.err("Some deleted messages were not removed", RespCode.SYS_TEMP)
        else:
            app(conn, event)

    out, _, conn = drive(LOGIN + b"QUIT\r\n", bytewise=False, answer=answer)
    assert seen == [State.UPDATE] and conn.state is State.CLOSED
    assert out.endswith(b"-ERR [SYS/TEMP] Some deleted messages were not removed\r\n")


def test_eof_closes(bytewise: bool) -> None:
    _out, events, conn = drive(LOGIN + b"STA", bytewise=bytewise, eof=True)
    assert events[-1] == ConnectionClosed() and conn.state is State.CLOSED


def test_stls_discards_pipelined_plaintext(bytewise: bool) -> None:
    out, events, conn = drive(b"STLS\r\nUSER evil\r\nPASS pw\r\n", bytewise=False)
    assert out == GREETING + b"+OK Begin TLS negotiation now\r\n"
    assert events == [pop3.StartTls()] and conn.tls_active
    conn.receive_data(b"CAPA\r\n")
    assert conn.next_event() is NEED_DATA
    capa = conn.data_to_send()
    assert b"USER\r\nSASL PLAIN LOGIN\r\n" in capa and b"STLS" not in capa


def test_stls_refusals() -> None:
    assert drive(b"STLS\r\n", bytewise=False, tls_available=False)[0].endswith(
        b"-ERR TLS is not available\r\n"
    )
    assert drive(b"STLS\r\n", bytewise=False, tls_active=True)[0].endswith(
        b"-ERR TLS is already active\r\n"
    )


def test_answering_discipline() -> None:
    conn = Connection("hi", tls_available=False, insecure_auth=True)
    conn.receive_data(b"USER a\r\nPASS b\r\nCAPA\r\n")
    assert isinstance(conn.next_event(), pop3.Login)
    with pytest.raises(UsageError):
        conn.next_event()
    with pytest.raises(UsageError):
        conn.ok()
    conn.accept_login()
    with pytest.raises(UsageError):
        conn.accept_login()


def test_close_from_our_side() -> None:
    _out, _, conn = drive(LOGIN, bytewise=False)
    conn.close("Disconnected for inactivity", RespCode.SYS_TEMP)
    assert conn.data_to_send() == b"-ERR [SYS/TEMP] Disconnected for inactivity\r\n"
    conn.receive_data(b"STAT\r\n")
    assert conn.next_event() == ConnectionClosed()


# ---------------------------------------------------------------------------- body encoding
def unstuff(data: bytes) -> bytes:
    """What a client recovers from a dot-stuffed multi-line body (RFC 1939 §3)."""
    assert data.endswith(b".\r\n")
    lines = data[:-3].split(b"\r\n")
    assert lines[-1] == b""
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines[:-1])


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def encode(data: bytes, cuts: list[int], lines: int | None = None) -> bytes:
    encoder = BodyEncoder(lines)
    out = b"".join(encoder.feed(chunk) for chunk in chunks(data, cuts))
    return out + encoder.finish()


message_bytes = st.lists(
    st.sampled_from([b"a", b".", b"\n", b"\r\n", b"..", b"\n.", b"x y", b"\r"]), max_size=40
).map(b"".join)


def wire_body(data: bytes) -> bytes:
    """The message as it should travel: CRLF lines, the last one closed."""
    body = crlf(data)
    if body.endswith(b"\r"):
        return body + b"\n"  # a CR at the very end is taken as the line end
    return body + b"\r\n" if body and not body.endswith(b"\n") else body


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


@given(message_bytes, st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_body_round_trip_any_chunking(data: bytes, cuts: list[int]) -> None:
    encoded = encode(data, cuts)
    assert encoded == encode(data, [])
    expected = wire_body(data)
    assert (unstuff(encoded) + b"\r\n" if expected else b"") == expected


@given(message_bytes, st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_crlf_counter_matches_what_is_sent(data: bytes, cuts: list[int]) -> None:
    counter = CrlfCounter()
    for chunk in chunks(data, cuts):
        counter.feed(chunk)
    assert counter.size == len(crlf(data))


@pytest.mark.parametrize(
    "lines, expected",
    [
        (0, b"A: 1\r\nB: 2\r\n\r\n"),
        (1, b"A: 1\r\nB: 2\r\n\r\n..one\r\n"),
        (2, b"A: 1\r\nB: 2\r\n\r\n..one\r\n\r\n"),
        (9, b"A: 1\r\nB: 2\r\n\r\n..one\r\n\r\nthree\r\n"),
    ],
)
def test_top_cuts_after_header_and_n_lines(lines: int, expected: bytes) -> None:
    data = b"A: 1\nB: 2\n\n.one\n\nthree\n"
    for cuts in ([], list(range(len(data)))):
        assert encode(data, cuts, lines) == expected + b".\r\n"


def test_top_done_stops_reading() -> None:
    encoder = BodyEncoder(0)
    encoder.feed(b"A: 1\n\nbody\n")
    assert encoder.done
    assert encoder.feed(b"more\n") == b""


def test_state_table_is_enforced_exhaustively() -> None:
    """Every known keyword, in each state a client can speak in: allowed or refused by table."""
    for state, prefix in ((State.AUTHORIZATION, b""), (State.TRANSACTION, LOGIN)):
        for keyword in sorted(pop3.KNOWN_COMMANDS):
            out, _, _ = drive(prefix + keyword.encode() + b" 1\r\n", bytewise=False,
                              tls_active=True)
            refused = out.endswith(b"-ERR Command not valid in this state\r\n")
            assert refused == (keyword not in pop3.COMMANDS[state]), (state, keyword, out)
