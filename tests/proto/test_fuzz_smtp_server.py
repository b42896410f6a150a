"""Protocol fuzzing of the SMTP server core: grammar-generated sessions, random byte splits.

Sessions are built from a grammar of valid commands, near-valid variants (case, spacing, missing
colon, junk parameters), over-long lines, NUL / 8-bit / bare CR / bare LF bytes, pipelined
batches, DATA bodies with dot-stuffing edge cases, BDAT chunks (declared size right, short or
long), AUTH exchanges and STARTTLS, against SMTP and LMTP listeners. The properties:

- feeding them never raises (only the core's own ProtocolUsageError would be a driver bug);
- every byte the core writes is well-formed SMTP: 3-digit replies from the core's repertoire,
  `code-text` continuation lines ending in `code text`, CRLF, at most 512 octets a line
  (RFC 5321 §4.5.3.1.5), nothing after the session closed;
- the replies, events and final state are the same whether the bytes arrive at once, one at a
  time or in random pieces. Two things are split-dependent *by design* and are kept out of that
  comparison: improper-pipelining detection (`forbid_unauth_pipelining`, which looks at what is
  buffered), and input after STARTTLS (after the 220 the rest of the plaintext buffer is
  dropped; in a real session the next bytes come over TLS), so a STARTTLS line always ends a
  segment and segments are never merged.

The decisions are answered by a policy that depends only on the event, never on timing, so the
answer to any given input is fixed.
"""

from __future__ import annotations

import base64
import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.proto.smtp_driver import Run, accept_all, drive
from tests.proto.splits import cut_into

from mailhaven.proto import smtp_server_events as ev
from mailhaven.proto.replies import MAX_REPLY_LINE, Reply
from mailhaven.proto.smtp_server import ServerConnection, ServerSettings

#: Every reply code the core (and the driver's policy) may send; anything else is a bug.
CODES = frozenset(
    {214, 220, 221, 235, 250, 252, 334, 354, 421, 452, 500, 501, 502, 503, 504, 535, 538, 550,
     552, 553, 554, 555}
)  # fmt: skip

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

GOOD_AUTH = base64.b64encode(b"\0user\0secret").decode()


def policy(event: ev.Event) -> Reply | None:
    """Refuse a few addresses by their spelling, accept the rest: deterministic per event."""
    match event:
        case ev.MailFrom(address) if address.startswith("bad"):
            return Reply(550, "Sender refused", "5.7.1")
        case ev.RcptTo(address) if address.startswith("bad"):
            return Reply(550, "User unknown", "5.1.1")
        case ev.RcptTo(address) if address.startswith("temp"):
            return Reply(452, "Try later", "4.5.3")
    return accept_all(event)


def auth(conn: ServerConnection, event: ev.AuthStart | ev.AuthResponse) -> None:
    """PLAIN with the one good token succeeds; LOGIN asks once; `*` cancels; the rest fails."""
    match event:
        case ev.AuthStart("LOGIN", None):
            conn.auth_challenge("VXNlcm5hbWU6")
        case ev.AuthStart("PLAIN", None):
            conn.auth_challenge("")
        case ev.AuthStart(_, initial) if initial == GOOD_AUTH:
            conn.auth_finish(Reply(235, "Authentication successful", "2.7.0"), "user")
        case ev.AuthResponse("*"):
            conn.auth_finish(Reply(501, "Authentication cancelled", "5.7.0"), None)
        case ev.AuthResponse(line) if line == GOOD_AUTH:
            conn.auth_finish(Reply(235, "Authentication successful", "2.7.0"), "user")
        case _:
            conn.auth_finish(Reply(535, "Authentication failed", "5.7.8"), None)


# ------------------------------------------------------------------------------------ grammar
_eol = st.sampled_from([b"\r\n"] * 40 + [b"\n", b"\r", b"\r\r\n", b" \r\n"])
_domain = st.sampled_from([b"example.org", b"mx.test", b"[127.0.0.1]", b"xn--bcher-kva.ch"])
_local = st.sampled_from([b"alice", b"bad", b"temp", b"postmaster", b'"a b"', b"x.y+z"])
_junk = st.binary(max_size=24)
_mail_params = st.lists(
    st.sampled_from(
        [b"SIZE=100", b"SIZE=999999999999", b"BODY=8BITMIME", b"BODY=BINARYMIME", b"SMTPUTF8",
         b"RET=FULL", b"RET=HDRS", b"ENVID=abc+2Bx", b"AUTH=<>", b"FOO=bar", b"SIZE=", b"=x",
         b"X" * 600 + b"=1"]
    ),
    max_size=3,
).map(b" ".join)  # fmt: skip
_rcpt_params = st.lists(
    st.sampled_from(
        [b"NOTIFY=NEVER", b"NOTIFY=SUCCESS,FAILURE", b"ORCPT=rfc822;a@b", b"ORCPT=utf-8;a@b",
         b"NOTIFY=BOGUS", b"X=1", b"Y" * 480]
    ),
    max_size=2,
).map(b" ".join)  # fmt: skip


@st.composite
def _address(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return b"<>"
    if kind == 1:
        return draw(_local) + b"@" + draw(_domain)  # no brackets
    if kind == 2:
        return b"<" + draw(_junk) + b">"
    if kind == 3:
        return "<j\u00f6rg@b\u00fccher.ch>".encode()
    return b"<" + draw(_local) + b"@" + draw(_domain) + b">"


def _verb(name: bytes) -> st.SearchStrategy[bytes]:
    return st.sampled_from([name, name.lower(), name.capitalize(), b" " + name])


@st.composite
def _command(draw: st.DrawFn) -> bytes:
    """One command line without its line end (a few kinds carry their own payload)."""
    kind = draw(st.integers(0, 21))
    match kind:
        case 0 | 1:
            verb = draw(st.sampled_from([b"EHLO", b"HELO", b"ehlo", b"LHLO"]))
            arg = draw(st.sampled_from([b" client.test", b"", b" a b", b" [1.2.3.4]", b"  x"]))
            return verb + arg
        case 2 | 3:
            sep = draw(st.sampled_from([b"FROM:", b"from:", b"FROM: ", b"FROM", b"TO:"]))
            return (
                draw(_verb(b"MAIL"))
                + b" "
                + sep
                + draw(_address())
                + (b" " + draw(_mail_params) if draw(st.booleans()) else b"")
            )
        case 4 | 5 | 6:
            sep = draw(st.sampled_from([b"TO:", b"to:", b"TO: ", b"TO", b"FROM:"]))
            return (
                draw(_verb(b"RCPT"))
                + b" "
                + sep
                + draw(_address())
                + (b" " + draw(_rcpt_params) if draw(st.booleans()) else b"")
            )
        case 7:
            return draw(st.sampled_from([b"DATA", b"data", b"DATA x"]))
        case 8:
            return draw(st.sampled_from([b"RSET", b"NOOP", b"rset x", b"NOOP hi", b"QUIT"]))
        case 9:
            return b"HELP" + draw(st.sampled_from([b"", b" MAIL", b" bogus", b" " + b"x" * 80]))
        case 10:
            verb = draw(st.sampled_from([b"VRFY", b"EXPN", b"ETRN"]))
            return verb + draw(st.sampled_from([b"", b" alice", b" @example.org", b" #q", b" a b"]))
        case 11:
            return draw(st.sampled_from([b"STARTTLS", b"STARTTLS x", b"starttls"]))
        case 12:
            mech = draw(st.sampled_from([b"PLAIN", b"LOGIN", b"plain", b"CRAM-MD5", b""]))
            initial = draw(
                st.sampled_from([b"", b" =", b" " + GOOD_AUTH.encode(), b" !!!", b" a b"])
            )
            return b"AUTH " + mech + initial
        case 13:
            return draw(st.sampled_from([b"SEND FROM:<a@b>", b"TURN", b"XYZZY", b"", b" "]))
        case 14:  # an over-long line, around each limit
            size = draw(st.sampled_from([509, 510, 511, 1110, 1111, 1200, 12288, 12889, 12900]))
            return draw(st.sampled_from([b"NOOP ", b"MAIL FROM:<", b"AUTH PLAIN ", b"X"])).ljust(
                size, b"a"
            )
        case 15:  # NUL, 8-bit and bare CR inside a command
            bad = draw(st.sampled_from([b"\x00", b"\xff", b"\xc3\xa9", b"\r", b"\x80\x80"]))
            return b"NOOP " + bad + b"x"
        case 16:
            return draw(_junk).replace(b"\n", b"")
        case _:  # a common valid command again: keeps sessions getting somewhere
            return draw(
                st.sampled_from(
                    [b"EHLO client.test", b"MAIL FROM:<alice@example.org>",
                     b"RCPT TO:<alice@example.org>", b"RCPT TO:<bad@example.org>", b"DATA"]
                )
            )  # fmt: skip


_body_line = st.sampled_from(
    [b"Subject: x", b"", b".", b"..", b"...", b".x", b"line", b"a\rb", b"a\nb", b"\x00\xff",
     b"x" * 1000]
)  # fmt: skip


@st.composite
def _data_body(draw: st.DrawFn) -> bytes:
    """A DATA body: lines with dot-stuffing edge cases, then (usually) a terminator."""
    lines = draw(st.lists(_body_line, max_size=6))
    eols = [draw(st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r"])) for _ in lines]
    body = b"".join(line + eol for line, eol in zip(lines, eols, strict=True))
    end = draw(st.sampled_from([b".\r\n"] * 6 + [b".\n", b"\n.\n", b"\r\n.\r\n", b""]))
    return body + end


@st.composite
def _bdat(draw: st.DrawFn) -> bytes:
    """BDAT with its chunk; the declared size may be right, short or long."""
    chunk = draw(st.binary(max_size=30))
    size = len(chunk) + draw(st.sampled_from([0, 0, 0, -1, 1, 5]))
    size = max(size, 0)
    last = draw(st.sampled_from([b"", b" LAST", b" last", b" LAST x", b"  LAST"]))
    count = draw(st.sampled_from([str(size).encode()] * 8 + [b"x", b"-1", b"9" * 20]))
    return b"BDAT " + count + last + b"\r\n" + chunk


_prefix = st.sampled_from(
    [b"", b"EHLO client.test\r\n", b"HELO client.test\r\n", b"LHLO client.test\r\n",
     b"LHLO client.test\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<alice@example.org>\r\n"
     b"RCPT TO:<temp@example.org>\r\n",
     b"EHLO client.test\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<alice@example.org>\r\n"]
)  # fmt: skip


@st.composite
def _transaction(draw: st.DrawFn) -> bytes:
    """A mostly valid transaction: MAIL, RCPTs, then a DATA body or BDAT chunks."""
    out = b"MAIL FROM:" + draw(_address()) + draw(_mail_params.map(lambda p: b" " + p)) + b"\r\n"
    for _ in range(draw(st.integers(1, 3))):
        out += b"RCPT TO:" + draw(_address()) + draw(_rcpt_params.map(lambda p: b" " + p)) + b"\r\n"
    if draw(st.booleans()):
        return out + b"DATA\r\n" + draw(_data_body())
    return out + b"".join(draw(st.lists(_bdat(), min_size=1, max_size=3)))


@st.composite
def segments(draw: st.DrawFn) -> list[bytes]:
    """A session's client bytes, cut after each STARTTLS line (see the module docstring)."""
    out: list[bytes] = []
    current = draw(_prefix)
    for _ in range(draw(st.integers(1, 20))):
        kind = draw(st.integers(0, 9))
        if kind <= 1:
            current += draw(_transaction())
        elif kind == 2:
            current += b"DATA\r\n" + draw(_data_body())
        elif kind == 3:
            current += draw(_bdat())
        elif kind == 4:  # an AUTH exchange: command, then a response line
            current += draw(st.sampled_from([b"AUTH LOGIN\r\n", b"AUTH PLAIN\r\n", b""]))
            current += draw(st.sampled_from([b"*", GOOD_AUTH.encode(), b"%%", b"x" * 13000]))
            current += b"\r\n"
        else:
            line = draw(_command())
            current += line + draw(_eol)
            if line.upper().strip().startswith(b"STARTTLS"):
                out.append(current)
                current = b""
    out.append(current)
    return out


server_settings = st.builds(
    ServerSettings,
    hostname=st.just("mx.test"),
    max_message_size=st.sampled_from([20, 36_700_160, 36_700_160]),
    max_recipients=st.sampled_from([1, 1000]),
    hard_error_limit=st.sampled_from([3, 20, 20, 20]),
    enhanced_status_codes=st.booleans(),
    pipelining=st.booleans(),
    chunking=st.booleans(),
    starttls=st.booleans(),
    tls_on_connect=st.booleans(),
    auth_mechanisms=st.sampled_from([(), ("PLAIN", "LOGIN"), ("PLAIN", "LOGIN")]),
    auth_requires_tls=st.booleans(),
    etrn=st.booleans(),
    forbid_unauth_pipelining=st.just(False),
    max_commands=st.sampled_from([5, 10_000, 10_000, 10_000]),
    lmtp=st.sampled_from([False, False, True]),
)


# ------------------------------------------------------------------------------------ checks
def _state(conn: ServerConnection, run: Run) -> tuple[object, ...]:
    return (
        conn.state,
        conn.helo,
        conn.extended,
        conn.authenticated,
        conn.tls,
        conn.mail,
        tuple(conn.recipients),
        conn.error_count,
        conn.command_count,
        [(e.command, e.reply.code) for e in run.events if isinstance(e, ev.Answered)],
    )


def play(
    chunks_per_segment: list[list[bytes]], config: ServerSettings, *, eof: bool = True
) -> tuple[Run, tuple[object, ...]]:
    """Feed each segment's chunks in order (the driver answers every decision at once)."""
    conn = ServerConnection(config)
    run = Run(b"")
    conn.greet()
    run.output += conn.data_to_send()
    for chunks in chunks_per_segment:
        for chunk in chunks:
            if conn.closed:
                break
            if chunk:
                conn.receive_data(chunk)
                drive(conn, policy, run, auth)
    if eof:
        conn.receive_data(b"")
        drive(conn, policy, run, auth)
    run.output += conn.data_to_send()
    return run, _state(conn, run)


def assert_well_formed(output: bytes) -> None:
    """The whole server output parses as SMTP replies from the core's repertoire."""
    assert output.endswith(b"\r\n"), output[-80:]
    lines = output[:-2].split(b"\r\n")
    code_in_progress: bytes | None = None
    for line in lines:
        assert b"\r" not in line and b"\n" not in line, line
        assert len(line) + 2 <= MAX_REPLY_LINE, (len(line), line[:80])
        assert len(line) >= 3 and line[:3].isdigit(), line[:80]
        assert int(line[:3]) in CODES, line[:80]
        sep = line[3:4]
        assert sep in (b"", b" ", b"-"), line[:80]
        if code_in_progress is not None:
            assert line[:3] == code_in_progress, (code_in_progress, line[:80])
        code_in_progress = line[:3] if sep == b"-" else None
    assert code_in_progress is None, "a multi-line reply never ended"


def events_of(run: Run) -> list[ev.Event]:
    """The events with adjacent BodyData joined (how the body is cut follows the input's cuts)
    and none before a BodyAborted or Closed (how much of a refused or cut-off body was passed on
    before the end, e.g. up to the size limit, depends on the cuts too; the application discards
    it all)."""
    out: list[ev.Event] = []
    for event in run.events:
        if (
            isinstance(event, ev.BodyAborted | ev.Closed)
            and out
            and isinstance(out[-1], ev.BodyData)
        ):
            out[-1] = event
        elif isinstance(event, ev.BodyData) and out and isinstance(out[-1], ev.BodyData):
            out[-1] = ev.BodyData(out[-1].data + event.data)
        else:
            out.append(event)
    return out


def assert_nothing_after_close(run: Run) -> None:
    closes = [i for i, e in enumerate(run.events) if isinstance(e, ev.Closed)]
    assert len(closes) <= 1
    if closes:
        assert closes[0] == len(run.events) - 1, run.events[closes[0] :]



# ------------------------------------------------------------------------------------ properties
@FUZZ
@given(segments(), server_settings, st.lists(st.integers(1, 40), min_size=1, max_size=8))
def test_same_replies_and_state_however_the_bytes_are_split(
    segs: list[bytes], config: ServerSettings, cuts: list[int]
) -> None:
    whole, whole_state = play([[s] for s in segs], config)
    assert_well_formed(whole.output)
    assert_nothing_after_close(whole)
    pieces, pieces_state = play([cut_into(s, cuts) for s in segs], config)
    assert pieces.output == whole.output
    assert events_of(pieces) == events_of(whole)
    assert pieces_state == whole_state


@settings(FUZZ, max_examples=60)
@given(segments(), server_settings)
def test_one_byte_at_a_time_is_the_same_as_all_at_once(
    segs: list[bytes], config: ServerSettings
) -> None:
    whole, whole_state = play([[s] for s in segs], config)
    single, single_state = play([cut_into(s, [1]) for s in segs], config)
    assert single.output == whole.output
    assert events_of(single) == events_of(whole)
    assert single_state == whole_state


@FUZZ
@given(
    segments(),
    server_settings.map(lambda s: dataclasses.replace(s, forbid_unauth_pipelining=True)),
    st.lists(st.integers(1, 40), min_size=1, max_size=8),
    st.booleans(),
)
def test_strict_pipelining_sessions_never_raise_and_answer_well_formed(
    segs: list[bytes], config: ServerSettings, cuts: list[int], eof: bool
) -> None:
    run, _ = play([cut_into(s, cuts) for s in segs], config, eof=eof)
    assert_well_formed(run.output)
    assert_nothing_after_close(run)
