"""The sans-I/O milter core, byte by byte: no sockets, no event loop.

Every reply stream is fed whole and one byte at a time and must give the same events."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.support.milter import pkt

from mailhaven.proto import milter as m
from mailhaven.proto.replies import Reply


def optneg(actions: int = m.ALL_ACTIONS, protocol: int = 0, extra: bytes = b"") -> bytes:
    return pkt(b"O", struct.pack(">III", 6, actions, protocol) + extra)


def feed(conn: m.MilterConnection, data: bytes, bytewise: bool) -> list[m.Event]:
    events: list[m.Event] = []
    pieces = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    for piece in pieces:
        conn.receive_data(piece)
        while not isinstance(event := conn.next_event(), m.Wait):
            events.append(event)
    return events


def negotiated(protocol: int = 0, actions: int = m.ALL_ACTIONS, **kw: int) -> m.MilterConnection:
    conn = m.MilterConnection(**kw)
    conn.negotiate()
    conn.data_to_send()
    feed(conn, optneg(actions, protocol), False)
    return conn


BYTEWISE = pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])


def test_negotiation_bytes_and_result() -> None:
    conn = m.MilterConnection()
    assert conn.next_event() is m.PAUSED  # nothing owed: the caller's turn
    conn.negotiate()
    assert conn.data_to_send() == pkt(b"O", struct.pack(">III", 6, 0x1FF, m.OFFERED_PROTOCOL))
    assert conn.pending == 1 and conn.next_event() is m.NEED_DATA
    events = feed(conn, optneg(0x1FF, m.SMFIP_NR_HDR | m.SMFIP_NOHELO), True)
    assert events == [m.Negotiated(6, 0x1FF, m.SMFIP_NR_HDR | m.SMFIP_NOHELO, {})]
    assert conn.pending == 0 and conn.negotiated
    assert conn.next_event() is m.PAUSED


@BYTEWISE
def test_negotiation_with_macro_lists(bytewise: bool) -> None:
    conn = m.MilterConnection()
    conn.negotiate()
    conn.data_to_send()
    lists = struct.pack(">I", 0) + b"j {daemon_name}\0" + struct.pack(">I", 2) + b"i {auth_authen}\0"
    (event,) = feed(conn, optneg(extra=lists), bytewise)
    assert isinstance(event, m.Negotiated)
    assert event.macros == {0: ("j", "{daemon_name}"), 2: ("i", "{auth_authen}")}
    conn.connect("h", "127.0.0.1", 25, {"j": "mx", "{daemon_name}": "smtp", "v": "x"})
    out = conn.data_to_send()
    # only the macros the milter asked for are sent, before the command
    assert out.startswith(pkt(b"D", b"Cj\0mx\0{daemon_name}\0smtp\0"))


def test_connect_packets_for_each_family() -> None:
    conn = negotiated()
    conn.connect("host.example", "192.0.2.1", 4321)
    assert conn.data_to_send() == pkt(b"C", b"host.example\0" + b"4" + struct.pack(">H", 4321) + b"192.0.2.1\0")
    conn.connect("h", "2001:db8::1", 25)
    assert conn.data_to_send() == pkt(b"C", b"h\0" + b"6" + struct.pack(">H", 25) + b"2001:db8::1\0")
    conn.connect("h", "/run/sock", 0)
    assert conn.data_to_send()[5:9] == b"h\0L\0"
    conn.connect("h", "", 0)
    assert conn.data_to_send() == pkt(b"C", b"h\0U")


def test_envelope_commands() -> None:
    conn = negotiated()
    assert conn.helo("client.example")
    assert conn.mail("a@b.example", ["SIZE=10"])
    assert conn.rcpt("c@d.example")
    assert conn.data_to_send() == (
        pkt(b"H", b"client.example\0") + pkt(b"M", b"<a@b.example>\0SIZE=10\0") + pkt(b"R", b"<c@d.example>\0")
    )
    assert conn.pending == 3


def test_no_and_noreply_flags_pipeline() -> None:
    conn = negotiated(protocol=m.SMFIP_NOHELO | m.SMFIP_NR_MAIL | m.SMFIP_NR_HDR)
    assert not conn.helo("x")  # not sent at all
    assert not conn.mail("a@b")  # sent, no reply owed
    assert not conn.header("Subject", " hi")
    assert conn.pending == 0
    assert conn.data_to_send() == pkt(b"M", b"<a@b>\0") + pkt(b"L", b"Subject\0hi\0")


def test_leading_space_kept_when_negotiated() -> None:
    conn = negotiated(protocol=m.SMFIP_HDR_LEADSPC)
    conn.header("Subject", " hi")
    assert conn.data_to_send() == pkt(b"L", b"Subject\0 hi\0")


@BYTEWISE
def test_verdicts_in_order(bytewise: bool) -> None:
    conn = negotiated()
    conn.helo("x")
    conn.mail("a@b")
    conn.rcpt("c@d")
    conn.rcpt("e@f")
    conn.rcpt("g@h")
    conn.rcpt("i@j")
    replies = pkt(b"c") + pkt(b"a") + pkt(b"r") + pkt(b"t") + pkt(b"d") + pkt(b"y", b"550 5.7.1 no thanks\0")
    events = feed(conn, replies, bytewise)
    assert events == [
        m.Verdict(m.Stage.HELO, m.Action.CONTINUE),
        m.Verdict(m.Stage.MAIL, m.Action.ACCEPT),
        m.Verdict(m.Stage.RCPT, m.Action.REJECT),
        m.Verdict(m.Stage.RCPT, m.Action.TEMPFAIL),
        m.Verdict(m.Stage.RCPT, m.Action.DISCARD),
        m.Verdict(m.Stage.RCPT, m.Action.REJECT, Reply(550, "no thanks", "5.7.1")),
    ]


@BYTEWISE
def test_every_edit_at_end_of_message(bytewise: bool) -> None:
    conn = negotiated()
    conn.end_of_message({"i": "QID"})
    assert conn.data_to_send() == pkt(b"D", b"Ei\0QID\0") + pkt(b"E")
    idx = struct.pack(">I", 2)
    replies = (
        pkt(b"p")
        + pkt(b"h", b"X-A\0one\0")
        + pkt(b"i", struct.pack(">I", 0) + b"X-B\0two\0")
        + pkt(b"m", idx + b"Subject\0\0")
        + pkt(b"b", b"new body\r\n")
        + pkt(b"e", b"<new@from>\0SIZE=5\0")
        + pkt(b"+", b"<add@rcpt>\0")
        + pkt(b"2", b"<par@rcpt>\0NOTIFY=NEVER\0")
        + pkt(b"-", b"<old@rcpt>\0")
        + pkt(b"q", b"looks odd\0")
        + pkt(b"c")
    )
    assert feed(conn, replies, bytewise) == [
        m.Progress(),
        m.AddHeader("X-A", "one"),
        m.InsertHeader(0, "X-B", "two"),
        m.ChangeHeader(2, "Subject", ""),
        m.ReplaceBody(b"new body\r\n"),
        m.ChangeFrom("new@from", "SIZE=5"),
        m.AddRecipient("add@rcpt"),
        m.AddRecipient("par@rcpt", "NOTIFY=NEVER"),
        m.DeleteRecipient("old@rcpt"),
        m.Quarantine("looks odd"),
        m.Verdict(m.Stage.EOM, m.Action.CONTINUE),
    ]


def test_body_chunk_size_and_skip() -> None:
    conn = negotiated(protocol=m.SMFIP_SKIP)
    assert conn.chunk_size == m.CHUNK_SIZE
    with pytest.raises(ValueError):
        conn.body(b"x" * (m.CHUNK_SIZE + 1))
    conn.body(b"x" * 10)
    assert feed(conn, pkt(b"s"), False) == [m.Verdict(m.Stage.BODY, m.Action.SKIP)]
    assert negotiated(protocol=m.SMFIP_MDS_1M).chunk_size == 1024 * 1024


@pytest.mark.parametrize(
    ("setup", "reply", "reason"),
    [
        ("helo", pkt(b"h", b"X\0y\0"), "outside end of message"),
        ("eom", pkt(b"Z"), "unknown reply"),
        ("none", pkt(b"c"), "unexpected reply"),
        ("helo", struct.pack(">I", 0), "bad packet length"),
        ("helo", struct.pack(">I", m.MAX_PACKET + 1) + b"c", "bad packet length"),
        ("helo", pkt(b"y", b"250 ok\0"), "bad reply code"),
        ("helo", pkt(b"y", b"550 no NUL"), "NUL"),
        ("helo", pkt(b"s"), "skip outside"),
        ("eom", pkt(b"i", b"\0\0"), "short header edit"),
        ("eom", pkt(b"h", b"\xff\0v\0"), "UTF-8"),
        ("eom", pkt(b"h", b"Bad Name\0v\0"), "bad header field name"),
        ("eom", pkt(b"i", b"\0\0\0\0X:\0v\0"), "bad header field name"),
        ("helo", b"", "closed"),
    ],
)
def test_garbage_fails_cleanly(setup: str, reply: bytes, reason: str) -> None:
    conn = negotiated()
    if setup == "helo":
        conn.helo("x")
    elif setup == "eom":
        conn.end_of_message()
    events = feed(conn, reply, False) if reply else (conn.receive_data(b""), [conn.next_event()])[1]
    assert len(events) == 1 and isinstance(events[0], m.Failed)
    assert reason in events[0].reason
    # dead: later calls are ignored, nothing more is sent
    assert not conn.helo("y")
    conn.receive_data(pkt(b"c"))
    assert conn.next_event() is m.PAUSED


def test_edit_not_negotiated_fails() -> None:
    conn = negotiated(actions=m.SMFIF_ADDHDRS)
    conn.end_of_message()
    (event,) = feed(conn, pkt(b"b", b"body"), False)
    assert isinstance(event, m.Failed) and "not negotiated" in event.reason


def test_replacement_body_is_bounded() -> None:
    conn = negotiated(max_body=100)
    conn.end_of_message()
    events = feed(conn, pkt(b"b", b"x" * 60) + pkt(b"b", b"x" * 60), False)
    assert events[0] == m.ReplaceBody(b"x" * 60)
    assert isinstance(events[1], m.Failed) and "exceeds 100" in events[1].reason


def test_negotiation_refusals() -> None:
    for data, reason in [
        (pkt(b"O", struct.pack(">III", 1, 0, 0)), "version"),
        (pkt(b"O", struct.pack(">III", 6, 0x400, 0)), "actions"),
        (pkt(b"O", struct.pack(">III", 6, 0, 0x800)), "protocol"),
        (pkt(b"O", b"\0\0"), "short"),
        (pkt(b"c"), "expected option negotiation"),
    ]:
        conn = m.MilterConnection()
        conn.negotiate()
        (event,) = feed(conn, data, False)
        assert isinstance(event, m.Failed) and reason in event.reason, data


def test_multiline_reply_code() -> None:
    reply = m.parse_reply_code("451-4.7.1 first\r\n451 4.7.1 second")
    assert reply == Reply(451, "first", "4.7.1", ("second",))
    with pytest.raises(m.ProtocolError):
        m.parse_reply_code("550-x\r\n451 y")


@BYTEWISE
@pytest.mark.parametrize(
    "reply",
    [pkt(b"t"), pkt(b"r"), pkt(b"a"), pkt(b"d"), pkt(b"y", b"451 4.3.0 no scanner\0")],
    ids=["tempfail", "reject", "accept", "discard", "replycode"],
)
def test_early_message_verdict_owes_no_later_reply(bytewise: bool, reply: bytes) -> None:
    # libmilter ignores the rest of a message it decided early: no reply comes for it
    conn = negotiated()
    conn.mail("a@b")
    feed(conn, pkt(b"c"), bytewise)
    conn.data()
    conn.header("From", "a@b")
    conn.header("Subject", "x")
    conn.eoh()
    conn.body(b"hi\r\n")
    conn.end_of_message()
    assert conn.pending == 6
    events = feed(conn, pkt(b"c") + reply, bytewise)
    assert [e.stage for e in events if isinstance(e, m.Verdict)] == [m.Stage.DATA, m.Stage.HEADER]
    assert conn.pending == 0
    assert not conn.body(b"more") and not conn.end_of_message()  # queued later: owes nothing too
    # the next transaction owes replies again
    assert conn.mail("c@d") and conn.pending == 1


def test_milter_without_envelope_stages_answers_the_rest() -> None:
    # libmilter: NOMAIL + NORCPT make the message's states reachable again from HELO
    conn = negotiated(protocol=m.SMFIP_NOMAIL | m.SMFIP_NORCPT)
    conn.header("From", "a@b")
    conn.header("Subject", "x")
    conn.end_of_message()
    feed(conn, pkt(b"r"), False)
    assert conn.pending == 2


def test_next_message_owes_replies_even_without_mail() -> None:
    conn = negotiated(protocol=m.SMFIP_NOMAIL)
    conn.header("From", "a@b")
    conn.end_of_message()
    feed(conn, pkt(b"r"), False)
    assert conn.pending == 0
    assert not conn.mail("c@d")  # not sent (SMFIP_NOMAIL), yet a new transaction
    assert conn.header("From", "c@d") and conn.end_of_message() and conn.pending == 2


def test_continue_and_rcpt_refusals_keep_the_message_going() -> None:
    conn = negotiated()
    conn.rcpt("x@y")
    conn.data()
    conn.header("From", "a@b")
    feed(conn, pkt(b"r") + pkt(b"c") + pkt(b"c"), False)
    conn.eoh()
    assert conn.pending == 1


def test_abort_and_quit_owe_nothing() -> None:
    conn = negotiated()
    conn.abort()
    conn.quit()
    assert conn.data_to_send() == pkt(b"A") + pkt(b"Q")
    assert conn.pending == 0


@given(st.lists(st.binary(max_size=40), max_size=20))
@settings(max_examples=300, deadline=None)
def test_any_bytes_give_events_or_failed_never_an_exception(chunks: list[bytes]) -> None:
    conn = negotiated(max_body=64)
    conn.helo("x")
    conn.end_of_message()
    for chunk in chunks:
        conn.receive_data(chunk)
        while not isinstance(event := conn.next_event(), m.Wait):
            assert isinstance(event, m.Negotiated | m.Verdict | m.Progress | m.Failed | m.Edit)
    assert conn.pending <= 2
