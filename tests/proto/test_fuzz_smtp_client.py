"""Protocol fuzzing of the SMTP client core: generated server reply streams, random byte splits.

The "server" is a stream of replies generated without looking at what the client sent: a
plausible session with replies replaced, inserted or cut off, or random replies (wrong codes, 421s,
multi-line replies whose codes disagree, bare-LF line ends, lines over the 2048-octet cap,
garbage, EHLO lists with random keywords) and early EOF, in SMTP and in LMTP mode. The driver plays the caller (starts a couple of transactions, sends the
body, completes or fails TLS). Properties:

- nothing raises: the core's own transition check (`TRANSITIONS`) and every caller-side call
  stay legal, and the session always ends with `Closed` within a bounded number of steps;
- what the client writes is well-formed: CRLF lines, no bare CR or LF, no NUL;
- each transaction gets exactly one result per distinct recipient, and a recipient is reported
  delivered only on the peer's 2xx to the end of DATA;
- the same events and output whether the replies arrive at once, in random pieces or one byte
  at a time. After the peer's 220 to STARTTLS the rest of the clear-text buffer is dropped by
  design (CVE-2011-0411), so the stream is cut into segments after every 220 and segments are
  never merged (in a real session the next bytes come over TLS).
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.proto.splits import cut_into

from mailhaven.proto import smtp_client as sc
from mailhaven.proto.envelope import RecipientSpec
from mailhaven.proto.replies import Reply

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
#: Steps beyond feeding the input: far more than any session here needs; hitting it means
#: the driver and the core are stuck.
MAX_STEPS = 2_000

_codes = st.sampled_from(
    [220, 221, 235, 250, 250, 250, 251, 252, 334, 354, 421, 450, 451, 452, 500, 501, 502, 503,
     504, 530, 535, 550, 552, 553, 554, 199, 600, 999]
)  # fmt: skip
_text = st.sampled_from(
    [b"Ok", b"", b"2.1.5 Ok", b"5.1.1 User unknown", b"4.7.0 later", b"3.0.0 odd", b"x" * 600,
     "caf\u00e9".encode(), b"\xff\xfe", b"VXNlcm5hbWU6"]
)  # fmt: skip
_keyword = st.sampled_from(
    [b"PIPELINING", b"SIZE 1000", b"SIZE", b"SIZE x", b"STARTTLS", b"AUTH PLAIN LOGIN",
     b"AUTH=LOGIN", b"AUTH CRAM-MD5", b"8BITMIME", b"SMTPUTF8", b"DSN", b"CHUNKING", b""]
)  # fmt: skip
_eol = st.sampled_from([b"\r\n"] * 12 + [b"\n", b"\r\r\n"])


@st.composite
def _reply(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 12))
    eol = draw(_eol)
    if kind == 0:  # an EHLO-style multi-line reply
        lines = [b"mx.peer.test", *draw(st.lists(_keyword, max_size=6))]
        code = draw(st.sampled_from([b"250", b"250", b"550", b"421"]))
        body = b"".join(code + b"-" + line + eol for line in lines[:-1])
        return body + code + b" " + lines[-1] + eol
    if kind == 1:  # a multi-line reply whose codes disagree
        return b"250-first" + eol + b"550 second" + eol
    if kind == 2:  # not a reply at all
        return draw(st.sampled_from([b"hello", b"25", b"2500 x", b"250x", b"\x00", b""])) + eol
    if kind == 3:  # over the client's line cap
        return b"250 " + b"y" * draw(st.sampled_from([2040, 2044, 2045, 2046, 3000])) + eol
    code = str(draw(_codes)).encode()
    sep = draw(st.sampled_from([b" ", b" ", b" ", b""]))
    return code + sep + (draw(_text) if sep else b"") + eol


@dataclass(frozen=True)
class Setup:
    starttls: sc.StartTLSPolicy
    credentials: sc.Credentials | None
    allow_plaintext_auth: bool
    tls_active: bool
    tls_works: bool
    transactions: tuple[sc.MailTransaction, ...]
    body: bytes
    lmtp: bool = False


_rcpt = st.sampled_from(
    [
        "a@peer.test",
        "b@peer.test",
        "c@peer.test",
        "a@peer.test",
        "bad\r\nRSET@x",
        "j\u00f6rg@peer.test",
    ]
).map(lambda a: RecipientSpec(a, notify=("SUCCESS", "FAILURE")))
_txn = st.builds(
    sc.MailTransaction,
    sender=st.sampled_from(["s@me.test", "s@me.test", "", "s\r\n@me.test"]),
    recipients=st.lists(_rcpt, min_size=1, max_size=3).map(tuple),
    size=st.sampled_from([None, 10, 5000]),
    smtputf8=st.sampled_from([False, False, True]),
    body_8bit=st.booleans(),
    dsn_ret=st.sampled_from([None, "HDRS"]),
    dsn_envid=st.sampled_from([None, "id+1"]),
)
setups = st.builds(
    Setup,
    starttls=st.sampled_from(list(sc.StartTLSPolicy)),
    credentials=st.sampled_from([None, sc.Credentials("user", "secret")]),
    allow_plaintext_auth=st.booleans(),
    tls_active=st.booleans(),
    tls_works=st.booleans(),
    transactions=st.lists(_txn, max_size=3).map(tuple),
    body=st.sampled_from([b"Subject: x\n\nbody\n", b".\r\n", b"a\rb\r\n.\n..", b""]),
    lmtp=st.sampled_from([False, False, True]),
)


EHLO_FULL = (
    b"250-mx.peer.test\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250-STARTTLS\r\n"
    b"250-AUTH PLAIN LOGIN\r\n250-8BITMIME\r\n250-DSN\r\n250 SMTPUTF8\r\n"
)


def happy_replies(setup: Setup) -> list[bytes]:
    """What a cooperative server would answer this client (pipelined, so in one order)."""
    out = [b"220 mx.peer.test ESMTP\r\n", EHLO_FULL]
    tls = setup.tls_active
    if setup.starttls is not sc.StartTLSPolicy.NEVER and not tls:
        out += [b"220 2.0.0 Ready to start TLS\r\n", EHLO_FULL.replace(b"250-STARTTLS\r\n", b"")]
        tls = setup.tls_works
    if setup.credentials is not None and (tls or setup.allow_plaintext_auth):
        out.append(b"235 2.7.0 Authentication successful\r\n")
    for txn in setup.transactions:
        out.append(b"250 2.1.0 Ok\r\n")
        distinct = len({r.address for r in txn.recipients})
        out += [b"250 2.1.5 Ok\r\n"] * distinct
        out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        # LMTP (RFC 2033 §4.2): one reply per accepted recipient after the body
        out += [b"250 2.0.0 Ok: delivered\r\n"] * (distinct if setup.lmtp else 1)
    return [*out, b"221 2.0.0 Bye\r\n"]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[bytes], Setup]:
    """A setup and the peer's replies in segments, each cut after a 220 (see the module
    docstring): a cooperative session with replies replaced, inserted or cut off, or random
    replies only."""
    setup = draw(setups)
    if draw(st.integers(0, 3)):
        replies = happy_replies(setup)
        for _ in range(draw(st.integers(0, 3))):
            pos = draw(st.integers(0, len(replies)))
            match draw(st.integers(0, 2)):
                case 0 if pos < len(replies):
                    replies[pos] = draw(_reply())
                case 1:
                    replies.insert(pos, draw(_reply()))
                case _:
                    del replies[pos:]
    else:
        replies = draw(st.lists(_reply(), max_size=25))
    segments, current = [], b""
    for reply in replies:
        current += reply
        if reply.startswith(b"220"):
            segments.append(current)
            current = b""
    segments.append(current)
    return segments, setup


def play(segments: list[list[bytes]], setup: Setup) -> tuple[list[sc.Event], bytes]:
    """Run a session; each inner list is fed piece by piece, EOF after the last."""
    conn = sc.ClientConnection(
        "client.test",
        starttls=setup.starttls,
        credentials=setup.credentials,
        allow_plaintext_auth=setup.allow_plaintext_auth,
        tls_active=setup.tls_active,
        lmtp=setup.lmtp,
    )
    chunks = [chunk for segment in segments for chunk in segment if chunk]
    todo = list(setup.transactions)
    started: list[sc.MailTransaction] = []
    events: list[sc.Event] = []
    out = b""
    eof = False
    steps = MAX_STEPS + len(chunks)  # each chunk fed is one step too
    for _ in range(steps):
        event = conn.next_event()
        out += conn.data_to_send()
        match event:
            case sc.Wait.NEED_DATA:
                if chunks:
                    conn.receive_data(chunks.pop(0))
                else:
                    assert not eof, "NEED_DATA after EOF"
                    conn.receive_data(b"")
                    eof = True
                continue
            case sc.Wait.PAUSED if conn.phase is sc.Phase.READY:
                if todo:
                    started.append(todo.pop(0))
                    conn.start(started[-1])
                else:
                    conn.quit()
            case sc.Wait.PAUSED:
                raise AssertionError(f"paused in {conn.phase}")
            case sc.StartTLS():
                if setup.tls_works:
                    conn.tls_started()
                else:
                    conn.tls_failed("handshake failure")
            case sc.SendBody():
                conn.send_body(setup.body)
                conn.end_body()
            case sc.TransactionDone(results):
                txn = started[-1]
                assert set(results) == {r.address for r in txn.recipients}
                for reply in results.values():
                    check_result(reply)
            case sc.Closed():
                events.append(event)
                return events, out + conn.data_to_send()
        events.append(event)
    raise AssertionError(f"no Closed after {steps} steps, in {conn.phase}")


def check_result(reply: Reply) -> None:
    if reply.is_success:  # delivered: only on the peer's own 2xx to the end of DATA
        assert reply.answered == "end of DATA", reply
    else:
        assert reply.code >= 300, reply


def assert_client_output_well_formed(out: bytes) -> None:
    if not out:
        return
    assert out.endswith(b"\r\n")
    for line in out[:-2].split(b"\r\n"):
        assert b"\r" not in line and b"\n" not in line and b"\0" not in line, line[:80]



@FUZZ
@given(scenarios(), st.lists(st.integers(1, 30), min_size=1, max_size=6))
def test_client_core_same_outcome_however_replies_are_split(
    scenario: tuple[list[bytes], Setup], cuts: list[int]
) -> None:
    segments, setup = scenario
    whole_events, whole_out = play([[s] for s in segments], setup)
    assert_client_output_well_formed(whole_out)
    split_events, split_out = play([cut_into(s, cuts) for s in segments], setup)
    assert split_events == whole_events
    assert split_out == whole_out


@settings(FUZZ, max_examples=100)
@given(scenarios())
def test_client_core_one_byte_at_a_time(scenario: tuple[list[bytes], Setup]) -> None:
    segments, setup = scenario
    whole_events, whole_out = play([[s] for s in segments], setup)
    single_events, single_out = play([cut_into(s, [1]) for s in segments], setup)
    assert single_events == whole_events
    assert single_out == whole_out
