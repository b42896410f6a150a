"""The milter chain over real loopback sockets against `tests.support.milter.TestMilter`:
every action, and milters that close, talk garbage, stall or flood a replacement body."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from tests.support import milter as tm
from tests.support.milter import TestMilter

from mailhaven.checks.milter import pool
from mailhaven.checks.milter.chain import MilterChain
from mailhaven.checks.milter.rewrite import edit_envelope, rewrite
from mailhaven.checks.milter.settings import MilterSettings, parse_endpoint
from mailhaven.proto import milter as m
from mailhaven.proto.envelope import Envelope, RecipientSpec
from mailhaven.proto.replies import MILTER_REJECTED as REJECTED
from mailhaven.proto.replies import MILTER_TEMPFAILED as TEMPFAILED
from mailhaven.proto.replies import Reply
from mailhaven.spool.message_writer import MessageWriter

MESSAGE = b"From: a@example.com\r\nSubject: hi\r\n\r\nhello\r\n"


def chain_for(*milters: TestMilter, **kw: object) -> MilterChain:
    settings = MilterSettings(
        endpoints=tuple(parse_endpoint(x.spec) for x in milters),
        **{"connect_timeout": 2.0, "command_timeout": 2.0, "content_timeout": 2.0, **kw},  # type: ignore[arg-type]
    )
    return MilterChain(settings)


def writer(tmp_path: Path, data: bytes = MESSAGE, inline: int = 1 << 16) -> MessageWriter:
    w = MessageWriter("QID1", tmp_path, inline)
    w.write(data)
    return w


async def envelope_stages(chain: MilterChain) -> list[Reply | None]:
    chain.start("client.example", "192.0.2.1", 4000, {"j": "mx.test"})
    return [
        await chain.helo("client.example", {}),
        await chain.mail("a@example.com", [], {"i": "QID1"}),
        await chain.rcpt("b@example.org", [], {}),
    ]


async def test_all_continue_sends_every_stage(tmp_path: Path, milter: TestMilter) -> None:
    chain = chain_for(milter)
    assert await envelope_stages(chain) == [None, None, None]
    verdict = await chain.end_of_message(writer(tmp_path), lambda: writer(tmp_path, b""), {"i": "QID1"})
    assert verdict.refusal is None and not verdict.edited
    chain.close()
    assert milter.seen("H") == [b"client.example\0"]
    assert milter.seen("M") == [b"<a@example.com>\0"]
    assert milter.seen("L") == [b"From\0a@example.com\0", b"Subject\0hi\0"]
    assert milter.seen("B") == [b"hello\r\n"]
    assert len(milter.seen("E")) == 1
    assert b"j\0mx.test\0" in milter.seen("D")[0]


@pytest.mark.parametrize(
    ("stage", "packet", "expected"),
    [
        ("H", tm.reject(), [REJECTED, TEMPFAILED.__class__(550, "Command rejected", "5.7.1"), None]),
        ("M", tm.tempfail(), [None, TEMPFAILED, None]),
        ("R", tm.replycode("550 5.1.1 no such user"), [None, None, Reply(550, "no such user", "5.1.1")]),
    ],
)
async def test_envelope_refusals(stage: str, packet: bytes, expected: list[Reply | None]) -> None:
    with TestMilter({stage: [packet]}) as milter:
        chain = chain_for(milter)
        got = await envelope_stages(chain)
        chain.close()
    assert got == expected


async def test_connect_reject_refuses_every_mail(tmp_path: Path) -> None:
    with TestMilter({"C": [tm.replycode("554 5.7.1 go away")]}) as milter:
        chain = chain_for(milter)
        helo, mail, _ = await envelope_stages(chain)
        chain.close()
    assert helo is None and mail == Reply(554, "go away", "5.7.1")


async def test_accept_at_mail_skips_the_rest_of_the_message(tmp_path: Path) -> None:
    with TestMilter({"M": [tm.accept()]}) as milter:
        chain = chain_for(milter)
        await envelope_stages(chain)
        verdict = await chain.end_of_message(writer(tmp_path), lambda: writer(tmp_path, b""), {})
        chain.close()
        assert verdict.refusal is None
        assert milter.seen("R") == [] and milter.seen("E") == []


async def test_every_edit_applied(tmp_path: Path) -> None:
    eom = [
        tm.progress(),
        tm.add_header("X-Scanned", "yes"),
        tm.insert_header(0, "X-Top", "1"),
        tm.change_header(1, "Subject", "changed"),
        tm.replace_body(b"new body\r\n"),
        tm.change_from("new@example.com"),
        tm.add_rcpt("c@example.org"),
        tm.del_rcpt("b@example.org"),
        tm.quarantine("suspicious"),
        tm.cont(),
    ]
    with TestMilter({"E": eom}) as milter:
        chain = chain_for(milter)
        await envelope_stages(chain)
        original = writer(tmp_path)
        verdict = await chain.end_of_message(original, lambda: writer(tmp_path, b""), {})
        chain.close()
    assert verdict.refusal is None and verdict.quarantine == "suspicious"
    new = await rewrite(original, verdict, lambda: MessageWriter("QID1", tmp_path, 1 << 16))
    assert new.read_back().read() == (
        b"X-Top: 1\r\nFrom: a@example.com\r\nSubject: changed\r\nX-Scanned: yes\r\n\r\nnew body\r\n"
    )
    env = edit_envelope(Envelope("a@example.com", (RecipientSpec("b@example.org"),)), verdict)
    assert env.sender == "new@example.com"
    assert [r.address for r in env.recipients] == ["c@example.org"]


async def test_discard_and_eom_reject(tmp_path: Path) -> None:
    with TestMilter({"E": [tm.discard()]}) as milter:
        chain = chain_for(milter)
        await envelope_stages(chain)
        verdict = await chain.end_of_message(writer(tmp_path), lambda: writer(tmp_path, b""), {})
        assert verdict.discard
        # the connection is reused for the next transaction
        milter.replies["E"] = [tm.replycode("554 5.7.1 spam")]
        await chain.mail("x@example.com", [], {})
        verdict = await chain.end_of_message(writer(tmp_path), lambda: writer(tmp_path, b""), {})
        chain.close()
        assert verdict.refusal == Reply(554, "spam", "5.7.1")
        assert milter.connections == 1


async def test_body_reject_stops_the_body(tmp_path: Path) -> None:
    big = b"Subject: x\r\n\r\n" + b"y" * (300 * 1024)
    with TestMilter({"B": [tm.reject()]}) as milter:
        chain = chain_for(milter, content_timeout=10.0)
        await envelope_stages(chain)
        started = time.monotonic()
        verdict = await chain.end_of_message(writer(tmp_path, big, 1024), lambda: writer(tmp_path, b""), {})
        took = time.monotonic() - started
        # the next transaction is in step: the milter (like libmilter) answers none of the
        # chunks (nor the EOM) pipelined after its reject, and none is waited for
        milter.replies.clear()
        assert await chain.mail("x@example.com", [], {}) is None
        chain.close()
    assert verdict.refusal == REJECTED
    assert took < 5.0


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (tm.tempfail(), TEMPFAILED),  # clamav-milter's OnFail Defer when clamd is down
        (tm.replycode("550 5.7.1 header says no"), Reply(550, "header says no", "5.7.1")),
        (tm.accept(), None),  # e.g. clamav-milter with every recipient allow-listed
    ],
    ids=["tempfail", "replycode", "accept"],
)
async def test_header_verdict_ends_the_message_at_once(
    tmp_path: Path, reply: bytes, expected: Reply | None
) -> None:
    with TestMilter({"L": [reply]}) as milter:
        chain = chain_for(milter, content_timeout=10.0)
        await envelope_stages(chain)
        started = time.monotonic()
        verdict = await chain.end_of_message(writer(tmp_path), lambda: writer(tmp_path, b""), {})
        took = time.monotonic() - started
        milter.replies.clear()
        assert await chain.mail("x@example.com", [], {}) is None  # in step
        chain.close()
    assert verdict.refusal == expected
    assert took < 5.0  # not the content timeout


@pytest.mark.parametrize("failure", [tm.CLOSE, tm.GARBAGE, tm.STALL])
@pytest.mark.parametrize(("action", "expected"), [("tempfail", TEMPFAILED), ("accept", None), ("reject", REJECTED)])
async def test_broken_milter_gets_the_default_action(
    tmp_path: Path, failure: str, action: str, expected: Reply | None
) -> None:
    with TestMilter({"E": failure}) as milter:
        chain = chain_for(milter, default_action=action, content_timeout=0.3)
        await envelope_stages(chain)
        started = time.monotonic()
        verdict = await chain.end_of_message(writer(tmp_path), lambda: writer(tmp_path, b""), {})
        took = time.monotonic() - started
        # the milter is dropped for the rest of the session: the default applies at once
        assert await chain.mail("x@example.com", [], {}) == expected
        chain.close()
    assert verdict.refusal == expected and not verdict.edited
    assert took < 2.0


async def test_milter_down_at_connect() -> None:
    milter = TestMilter()  # bound, never started: connections hang in the backlog
    port = milter.port
    milter.stop()  # now closed: connect is refused
    settings = MilterSettings(endpoints=(parse_endpoint(f"inet:127.0.0.1:{port}"),), default_action="tempfail")
    chain = MilterChain(settings)
    chain.start("h", "192.0.2.1", 1, {})
    assert await chain.helo("h", {}) is None
    assert await chain.mail("a@b", [], {}) == TEMPFAILED
    chain.close()


async def test_huge_replacement_body_is_refused_not_stored(tmp_path: Path) -> None:
    chunk = tm.replace_body(b"z" * 65535)

    def flood(data: bytes) -> list[bytes]:
        return [chunk] * 1600 + [tm.cont()]  # 100 MiB

    with TestMilter({"E": flood}) as milter:
        chain = chain_for(milter, max_body=1024 * 1024, default_action="tempfail")
        await envelope_stages(chain)
        bodies: list[MessageWriter] = []

        def new_body() -> MessageWriter:
            bodies.append(MessageWriter("QID1", tmp_path, 1 << 16))
            return bodies[-1]

        verdict = await chain.end_of_message(writer(tmp_path), new_body, {})
        chain.close()
    assert verdict.refusal == TEMPFAILED and verdict.body is None
    assert list(tmp_path.iterdir()) == [] or all(not p.name.startswith("QID1.") or p.stat().st_size == 0 for p in tmp_path.iterdir())


async def test_two_milters_first_refusal_wins_edits_in_order(tmp_path: Path) -> None:
    with TestMilter({"E": [tm.add_header("X-One", "1"), tm.cont()]}) as one, TestMilter(
        {"E": [tm.add_header("X-Two", "2"), tm.cont()]}
    ) as two:
        chain = chain_for(one, two)
        await envelope_stages(chain)
        original = writer(tmp_path)
        verdict = await chain.end_of_message(original, lambda: writer(tmp_path, b""), {})
        chain.close()
    new = await rewrite(original, verdict, lambda: MessageWriter("QID1", tmp_path, 1 << 16))
    assert b"X-One: 1\r\nX-Two: 2\r\n\r\nhello" in new.read_back().read()


#: rspamd's negotiation: no reply owed for anything but end of message
RSPAMD_LIKE = 0xFF080


async def test_noreply_stages_are_answered_without_waiting(tmp_path: Path) -> None:
    with TestMilter({"E": [tm.add_header("X-A", "1"), tm.accept()]}, protocol=RSPAMD_LIKE) as milter:
        chain = chain_for(milter)
        chain.start("client.example", "192.0.2.1", 4000, {})
        await chain.helo("client.example", {})  # connected and negotiated from here on
        assert chain.quick(m.Stage.MAIL) and chain.quick(m.Stage.RCPT)
        chain.mail_now("a@example.com", [], {"i": "QID1"})
        chain.rcpt_now("b@example.org", [], {})
        verdict = await chain.end_of_message(writer(tmp_path), lambda: writer(tmp_path, b""), {})
        chain.close()
    assert verdict.header_edits == [m.AddHeader("X-A", "1")]
    assert milter.seen("M") == [b"<a@example.com>\0"] and milter.seen("R") == [b"<b@example.org>\0"]


async def test_reused_connection_serves_the_next_session(tmp_path: Path) -> None:
    pool.clear()
    with TestMilter({"E": [tm.accept()]}, protocol=RSPAMD_LIKE) as milter:
        for _ in range(3):
            chain = chain_for(milter, reuse=frozenset({milter.spec}))
            await envelope_stages(chain)
            verdict = await chain.end_of_message(writer(tmp_path), lambda: writer(tmp_path, b""), {})
            assert verdict.refusal is None
            chain.close()
        pool.clear()
        await asyncio.sleep(0)  # let the loop flush the last writes before the milter stops
        await asyncio.to_thread(milter.wait_seen, "C", 3)
    assert milter.connections == 1
    # each QUIT_NC goes out with the next session's first write: the idle one closed at the
    # end never needed its own
    assert len(milter.seen("O")) == 1 and len(milter.seen("K")) == 2 and len(milter.seen("C")) == 3
    kinds = [cmd for cmd, _ in milter.commands if cmd != b"D"]  # D: macros, before their command
    assert all(kinds[i + 1] == b"C" for i, k in enumerate(kinds) if k == b"K")
