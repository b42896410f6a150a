"""Protocol fuzzing of the POP3 server core: generated command streams, random byte splits.

Commands come from a grammar of valid commands in and out of their state (USER/PASS, AUTH
PLAIN with and without an initial response, SASL continuation lines, STLS, CAPA, STAT, LIST,
UIDL, RETR, TOP, DELE, NOOP, RSET, QUIT, APOP), near-valid variants (case, missing or extra
arguments, huge numbers), over-long lines on both sides of each limit, NUL, 8-bit bytes and bare
CR/LF. The driver plays a two-message maildrop whose password is "secret". Properties:

- nothing raises;
- the output is a sequence of well-formed responses: `+OK` / `-ERR` status lines (or `+ ` SASL
  challenges) of at most 512 octets (RFC 2449 §4), multi-line responses dot-stuffed and ended by
  a lone `.`, RETR giving back exactly the stored message (CRLF line ends);
- the same responses, events and state whether the bytes arrive at once, in random pieces or one
  at a time. After `+OK` to STLS the buffered plaintext is dropped by design (CVE-2011-0411), so
  an STLS line ends a segment and segments are never merged.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.proto.splits import cut_into

from mailhaven.proto import pop3

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MESSAGES = {
    1: b"Subject: one\n\n.leading dot\n..two dots\nlast line\n",
    2: b"Subject: two\r\n\r\n.\r\nno final newline",
}
GOOD_PLAIN = base64.b64encode(b"\0alice\0secret")
BAD_PLAIN = base64.b64encode(b"\0alice\0wrong")


def expected_wire_body(n: int) -> bytes:
    """What RETR must give back once un-stuffed: CRLF lines, a final CRLF."""
    body = MESSAGES[n].replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return body if body.endswith(b"\r\n") else body + b"\r\n"


# ------------------------------------------------------------------------------------ grammar
_num = st.sampled_from([b"1", b"2", b"3", b"0", b"-1", b"x", b"99999999999", b"1 2", b""])


@st.composite
def _line(draw: st.DrawFn) -> bytes:
    match draw(st.integers(0, 15)):
        case 0:
            return draw(st.sampled_from([b"USER alice", b"user alice", b"USER", b"USER  "]))
        case 1:
            return draw(st.sampled_from([b"PASS secret", b"PASS wrong", b"PASS", b"PASS a b"]))
        case 2:
            initial = draw(
                st.sampled_from([b" " + GOOD_PLAIN, b" " + BAD_PLAIN, b" =", b"", b" !"])
            )
            return b"AUTH " + draw(st.sampled_from([b"PLAIN", b"plain", b"LOGIN", b""])) + initial
        case 3:  # a SASL continuation line (or a stray one)
            return draw(st.sampled_from([GOOD_PLAIN, BAD_PLAIN, b"*", b"%%", b""]))
        case 4:
            return draw(st.sampled_from([b"CAPA", b"STLS", b"NOOP", b"RSET", b"QUIT", b"STAT"]))
        case 5 | 6:
            verb = draw(st.sampled_from([b"LIST", b"UIDL", b"RETR", b"DELE", b"list", b"retr"]))
            return verb + b" " + draw(_num)
        case 7:
            return b"TOP " + draw(_num) + b" " + draw(_num)
        case 8:
            return draw(st.sampled_from([b"APOP alice 0123", b"LIST", b"UIDL", b"STAT x"]))
        case 9:  # around each line limit
            size = draw(st.sampled_from([252, 253, 254, 300, 12_352, 12_353, 13_000]))
            return draw(st.sampled_from([b"NOOP ", b"PASS ", b"AUTH PLAIN ", b"X"])).ljust(
                size, b"a"
            )
        case 10:
            return b"NOOP" + draw(st.sampled_from([b"\x00", b"\xff", b"\xc3\xa9", b"\r"]))
        case 11:
            return draw(st.binary(max_size=20)).replace(b"\n", b"")
        case _:  # the usual login, to reach the TRANSACTION state often
            return draw(
                st.sampled_from([b"USER alice\r\nPASS secret", b"AUTH PLAIN " + GOOD_PLAIN])
            )


_eol = st.sampled_from([b"\r\n"] * 30 + [b"\n", b"\r\r\n"])


@st.composite
def segments(draw: st.DrawFn) -> list[bytes]:
    out, current = [], b""
    for _ in range(draw(st.integers(1, 25))):
        line = draw(_line())
        current += line + draw(_eol)
        if line.upper() == b"STLS":
            out.append(current)
            current = b""
    out.append(current)
    return out


@dataclass(frozen=True)
class Setup:
    tls_available: bool
    tls_active: bool
    insecure_auth: bool
    eof: bool


setups = st.builds(Setup, st.booleans(), st.booleans(), st.booleans(), st.booleans())


# ------------------------------------------------------------------------------------ driver
def answer(conn: pop3.Connection, event: pop3.Event, deleted: set[int]) -> None:
    """A two-message maildrop: what the application would say (deterministic per event)."""
    alive = [n for n in MESSAGES if n not in deleted]
    match event:
        case pop3.Login(_, password):
            if password == "secret":
                conn.accept_login()
            else:
                conn.reject_login(pop3.RespCode.AUTH, "Authentication failed")
        case pop3.Stat():
            conn.ok(f"{len(alive)} {sum(len(MESSAGES[n]) for n in alive)}")
        case pop3.ListMessages(None) | pop3.Uidl(None):
            conn.listing("listing follows", [f"{n} {len(MESSAGES[n])}" for n in alive])
        case pop3.ListMessages(n) | pop3.Uidl(n) | pop3.Dele(n) if n not in alive:
            conn.err("No such message")
        case pop3.ListMessages(n) | pop3.Uidl(n):
            conn.ok(f"{n} {len(MESSAGES[n])}")
        case pop3.Dele(n):
            deleted.add(n)
            conn.ok("Deleted")
        case pop3.Retr(n) | pop3.Top(n, _) if n not in alive:
            conn.err("No such message")
        case pop3.Retr(n) | pop3.Top(n, _):
            kind = "retr" if isinstance(event, pop3.Retr) else "top"
            encoder = conn.message_begin(f"{kind} {n} follows")
            data = MESSAGES[n]
            for i in range(0, len(data), 7):  # stored bytes are read in pieces, too
                conn.message_data(encoder, data[i : i + 7])
            conn.message_end(encoder)
        case pop3.Rset():
            deleted.clear()
            conn.ok()
        case pop3.Quit():
            conn.ok("Bye")
        case pop3.StartTls():
            conn.tls_started()
        case pop3.ConnectionClosed():
            pass


def play(chunks_per_segment: list[list[bytes]], setup: Setup) -> tuple[bytes, list[object], object]:
    conn = pop3.Connection(
        "mailhaven ready",
        tls_available=setup.tls_available,
        tls_active=setup.tls_active,
        insecure_auth=setup.insecure_auth,
    )
    out = conn.data_to_send()
    events: list[object] = []
    deleted: set[int] = set()
    chunks = [c for segment in chunks_per_segment for c in segment if c]
    if setup.eof:
        chunks.append(b"")
    for chunk in chunks:
        if conn.state is pop3.State.CLOSED:
            break
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not pop3.NEED_DATA:
            events.append(event)
            answer(conn, event, deleted)
            out += conn.data_to_send()
            if isinstance(event, pop3.ConnectionClosed):
                break
        out += conn.data_to_send()
    state = (conn.state, conn.tls_active, conn.bad_commands, conn.auth_failures, sorted(deleted))
    return out, events, state


def assert_well_formed(out: bytes) -> None:
    assert out.endswith(b"\r\n")
    lines = out[:-2].split(b"\r\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        assert b"\r" not in line and b"\n" not in line, line[:80]
        assert len(line) + 2 <= pop3.MAX_RESPONSE_LINE, line[:80]
        assert line in (b"+OK", b"-ERR") or line.startswith((b"+OK ", b"-ERR ", b"+ ")), line[:80]
        i += 1
        multi = line in (b"+OK Capability list follows", b"+OK listing follows") or (
            line.startswith((b"+OK retr ", b"+OK top "))
            or (line == b"+OK" and i < len(lines) and not _is_status(lines[i]))
        )
        if not multi:
            continue
        body = b""
        while lines[i] != b".":
            assert not lines[i].startswith(b".") or lines[i].startswith(b".."), lines[i]
            body += lines[i].removeprefix(b".") + b"\r\n"
            i += 1
        i += 1
        if line.startswith(b"+OK retr "):
            assert body == expected_wire_body(int(line.split()[2]))


def _is_status(line: bytes) -> bool:
    return line in (b"+OK", b"-ERR") or line.startswith((b"+OK ", b"-ERR ", b"+ "))



# ------------------------------------------------------------------------------------ properties
@FUZZ
@given(segments(), setups, st.lists(st.integers(1, 40), min_size=1, max_size=8))
def test_pop3_core_same_responses_however_the_bytes_are_split(
    segs: list[bytes], setup: Setup, cuts: list[int]
) -> None:
    whole = play([[s] for s in segs], setup)
    assert_well_formed(whole[0])
    assert play([cut_into(s, cuts) for s in segs], setup) == whole


@settings(FUZZ, max_examples=60)
@given(segments(), setups)
def test_pop3_core_one_byte_at_a_time(segs: list[bytes], setup: Setup) -> None:
    whole = play([[s] for s in segs], setup)
    assert play([cut_into(s, [1]) for s in segs], setup) == whole
