"""`mailhaven queue ...` and `mailq` on a spool filled through the real Spool API."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from tests.fakes import FakeClock, put

from mailhaven.cli.queue import mailq_main, main
from mailhaven.config import Config
from mailhaven.control import channel as control
from mailhaven.control.channel import SOCKET_NAME, ControlServer
from mailhaven.control.queue_admin import QueueAdmin
from mailhaven.pickup.dropfile import DropDirs, DropWriter
from mailhaven.proto.replies import Reply
from mailhaven.spool import Hold, RecipientUpdate, Spool, Status, list_queue
from mailhaven.spool.lock import DaemonLock, lock_path

NOW = 1_700_000_000.0


def cli(config: Config, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), config=config, stdout=out, stderr=err, now=NOW + 60)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(state_dir=str(tmp_path / "state"), hostname="mx.test")


async def fill(spool: Spool) -> tuple[str, str, str]:
    a = await put(spool, b"Subject: a\r\n\r\n" + b"x" * 3000, "bob@example.net")
    await spool.record(a, [
        RecipientUpdate(0, Status.DEFERRED, NOW + 300, Reply(451, "Try again later", "4.7.1"),
                        relay="mx.example.net[192.0.2.1]:25")
    ])
    b = await put(spool, b"bounce\r\n", "x@one.example", "y@two.example", sender="")
    await spool.hold(b)
    c = await put(spool, b"c\r\n", "done@example.net", "todo@example.net")
    await spool.record(c, [RecipientUpdate(0, Status.SENT, None, Reply(250, "ok", "2.0.0"))])
    return a, b, c


@pytest.fixture
def filled(config: Config) -> Iterator[tuple[str, str, str]]:
    spool = Spool(config.spool_path, inline_limit=1024, clock=FakeClock(NOW))
    spool.open()
    try:
        ids = asyncio.run(fill(spool))
    finally:
        spool.close()
    yield ids


def stamp(t: float) -> str:
    return time.asctime(time.localtime(t))[:19]


def test_mailq_format_is_postfix_s(config: Config, filled: tuple[str, str, str]) -> None:
    a, b, c = filled
    sizes = {m.queue_id: m.size for m in list_queue(config.spool_path)}
    out = io.StringIO()
    assert mailq_main([], config=config, stdout=out) == 0
    pad = " " * 47
    why = "host mx.example.net[192.0.2.1]:25 said: 451 4.7.1 Try again later"
    expected = [
        "----Queue ID----- --Size-- ---Arrival Time---- --Sender/Recipient------",
        f"{a + ' ':<17} {sizes[a]:>8} {stamp(NOW)} alice@example.org",
        " " * (76 - len(why)) + f"({why})",
        f"{pad}bob@example.net",
        "",
        f"{b + '!':<17} {sizes[b]:>8} {stamp(NOW)} MAILER-DAEMON",
        f"{pad}x@one.example",
        f"{pad}y@two.example",
        "",
        f"{c + ' ':<17} {sizes[c]:>8} {stamp(NOW)} alice@example.org",
        f"{pad}todo@example.net",
        "",
        f"-- {sum(sizes.values()) // 1024} Kbytes in 3 Requests.",
    ]
    assert out.getvalue() == "\n".join(expected) + "\n"
    status, listed, _ = cli(config, "list")
    assert (status, listed) == (0, out.getvalue())


def test_empty_queue(config: Config) -> None:
    out = io.StringIO()
    assert mailq_main([], config=config, stdout=out) == 0
    assert out.getvalue() == "Mail queue is empty\n"
    status, listed, err = cli(config, "list")
    assert (status, listed) == (0, "Mail queue is empty\n")
    assert err == "mailhaven queue: warning: Mail system is down -- accessing queue directly\n"


def test_mailq_while_the_daemon_is_down_shows_the_maildrop(config: Config) -> None:
    """Postfix: "Mail system is down" on stderr, and what waits in the maildrop is listed
    (showq's maildrop queue), not "Mail queue is empty"."""
    dirs = DropDirs(config.state_path / "maildrop")
    dirs.create()
    writer = DropWriter(dirs, {
        "sender": "carol@example.org",
        "recipients": [{"address": "dave@example.net", "notify": [], "orcpt": None},
                       {"address": "\x1b[2Jevil@example.net", "notify": [], "orcpt": None}],
        "time": NOW,
    })
    writer.write(b"Subject: waiting\r\n\r\n" + b"x" * 2048)
    name = writer.commit()
    out, err = io.StringIO(), io.StringIO()
    assert mailq_main([], config=config, stdout=out, stderr=err) == 0
    assert "Mail system is down" in err.getvalue()
    text = out.getvalue()
    assert "Mail queue is empty" not in text
    assert f"{name} " in text and "carol@example.org" in text and "dave@example.net" in text
    assert "\x1b" not in text  # a local user's bytes never reach the terminal raw
    assert text.endswith("-- 2 Kbytes in 1 Request.\n")
    status, listed, _ = cli(config, "list", "--json")
    [row] = [json.loads(line) for line in listed.splitlines()]
    assert (status, row["queue_name"], row["queue_id"]) == (0, "maildrop", name)
    assert row["recipients"][0]["address"] == "dave@example.net"


def test_all_and_ids_on_stdin_like_postsuper(
    config: Config, filled: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, c = filled
    monkeypatch.setattr(control, "MAX_IDS", 2)  # ALL goes in requests the channel accepts

    def run(*argv: str, stdin: str = "") -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        status = main(list(argv), config=config, stdout=out, stderr=err,
                      stdin=io.StringIO(stdin), now=NOW + 60)
        return status, out.getvalue(), err.getvalue()

    def held() -> set[str]:
        return {m.queue_id for m in list_queue(config.spool_path)
                if any(r.hold & Hold.ADMIN for r in m.recipients)}

    assert run("hold", "ALL")[:2] == (0, "hold: 3 message(s)\n")
    assert held() == {a, b, c}
    assert run("release", "-", stdin=f"{a}\n{c}\n")[:2] == (0, "release: 2 message(s)\n")
    assert held() == {b}
    assert run("requeue", "ALL")[0] == 0
    status, _, err = run("delete", "-", stdin="not-an-id\n")
    assert status == 1 and "not a queue id" in err
    assert run("delete", "-", stdin=f"{b}\n")[:2] == (0, "delete: 1 message(s)\n")
    assert run("delete", "ALL")[:2] == (0, "delete: 2 message(s)\n")
    assert list(list_queue(config.spool_path)) == []
    assert run("delete", "ALL")[:2] == (0, "delete: 0 message(s)\n")


def test_list_json(config: Config, filled: tuple[str, str, str]) -> None:
    _a, _b, _c = filled
    status, out, _ = cli(config, "list", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert status == 0 and [r["queue_id"] for r in rows] == list(filled)
    first = rows[0]
    assert (first["queue_name"], first["sender"], first["arrival_time"]) == (
        "deferred", "alice@example.org", int(NOW)
    )
    rcpt = first["recipients"][0]
    assert rcpt["address"] == "bob@example.net" and rcpt["attempts"] == 1
    assert rcpt["delay_reason"].endswith("451 4.7.1 Try again later")
    assert rcpt["next_attempt"] == int(NOW + 300)
    assert rows[1]["queue_name"] == "hold" and rows[1]["recipients"][0]["hold"] == ["admin"]


def test_show(config: Config, filled: tuple[str, str, str]) -> None:
    a, _b, c = filled
    status, out, _ = cli(config, "show", a)
    assert status == 0
    assert f"queue id:     {a}" in out
    assert "sender:       <alice@example.org>" in out
    assert "options:      BODY=7BIT" in out
    assert "    attempts:     1" in out
    assert "    last reply:   host mx.example.net[192.0.2.1]:25 said: 451 4.7.1 Try again later" in out
    assert "(in 4m0s)" in out  # next attempt, relative to now
    status, out, _ = cli(config, "show", c, "--json")
    data = json.loads(out)
    assert [r["status"] for r in data["recipients"]] == ["sent", "pending"]
    assert data["envelope"]["sender"] == "alice@example.org"
    assert cli(config, "show", "NOSUCHID0000000")[0] == 1


def test_changes_without_a_daemon(config: Config, filled: tuple[str, str, str]) -> None:
    a, b, c = filled

    def by_id() -> dict[str, list[object]]:
        return {m.queue_id: list(m.recipients) for m in list_queue(config.spool_path)}

    assert cli(config, "hold", a)[:2] == (0, "hold: 1 message(s)\n")
    assert all(r.hold & Hold.ADMIN for r in by_id()[a])  # type: ignore[attr-defined]
    assert cli(config, "release", a, b)[0] == 0
    assert not any(r.hold for r in by_id()[b])  # type: ignore[attr-defined]
    status, out, _ = cli(config, "flush")
    assert status == 0 and "daemon not running" in out
    assert cli(config, "requeue", c)[0] == 0
    assert cli(config, "delete", b)[:2] == (0, "delete: 1 message(s)\n")
    assert set(by_id()) == {a, c}
    status, _, err = cli(config, "delete", b, "not-an-id")
    assert status == 1 and "not a queue id" in err
    assert cli(config, "flush", "--domain", "example.net")[0] == 0
    assert cli(config, "flush", "--domain", "x", a)[0] == 2


def test_a_locked_queue_is_not_touched(config: Config, filled: tuple[str, str, str]) -> None:
    lock = DaemonLock.acquire(lock_path(config.spool_path))
    assert lock is not None
    try:
        status, _, err = cli(config, "hold", filled[0])
    finally:
        lock.release()
    assert status == 1 and "locked" in err
    assert not any(
        r.hold for m in list_queue(config.spool_path) if m.queue_id == filled[0]
        for r in m.recipients
    )


@pytest.fixture
async def daemon(config: Config, filled: tuple[str, str, str]) -> AsyncIterator[list[int]]:
    spool = Spool(config.spool_path)
    await asyncio.to_thread(spool.open)
    wakes: list[int] = []
    server = ControlServer(
        config.state_path / SOCKET_NAME, QueueAdmin(spool, wake=lambda: wakes.append(1))
    )
    await server.start()
    yield wakes
    await server.close()
    await asyncio.to_thread(spool.close)


async def test_changes_go_through_the_daemon_when_it_runs(
    config: Config, filled: tuple[str, str, str], daemon: list[int]
) -> None:
    a, _b, _c = filled
    status, out, _ = await asyncio.to_thread(cli, config, "requeue", a)
    assert (status, out) == (0, "requeue: 1 message(s)\n")
    assert daemon == [1]  # the daemon's scheduler was woken
    status, out, _ = await asyncio.to_thread(cli, config, "flush")
    assert status == 0 and "daemon not running" not in out
    status, out, err = await asyncio.to_thread(cli, config, "list")
    assert status == 0 and a in out and "down" not in err


def test_usage(config: Config) -> None:
    assert cli(config, "frobnicate")[0] == 2
    assert cli(config, "hold")[0] == 2
    assert mailq_main(["-v"], config=config, stderr=io.StringIO()) == 2


def test_reason_unavailable_after_a_reason() -> None:
    from mailhaven.cli.queue import mailq_lines
    from mailhaven.spool import MessageSummary, RecipientState

    def rcpt(index: int, status: Status, why: str | None) -> RecipientState:
        return RecipientState(
            index, f"r{index}@x.example", f"r{index}@x.example", (), None, status, Hold.NONE,
            False, 1 if why else 0, NOW, Reply(450, why, None) if why else None, None, None,
        )

    msg = MessageSummary(
        "1K132SF6WGPHAEC", NOW, 2048, "a@b.example", False,
        (rcpt(0, Status.DEFERRED, "mailbox busy"), rcpt(1, Status.DEFERRED, "mailbox busy"),
         rcpt(2, Status.PENDING, None)),
    )
    lines = list(mailq_lines(iter([msg])))
    assert lines[2:] == [
        " " * (76 - len("450 mailbox busy")) + "(450 mailbox busy)",
        " " * 47 + "r0@x.example",
        " " * 47 + "r1@x.example",
        " " * (76 - len("reason unavailable")) + "(reason unavailable)",
        " " * 47 + "r2@x.example",
        "",
        "-- 2 Kbytes in 1 Request.",
    ]


def test_mailq_output_goes_out_in_chunks_and_is_unchanged(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from mailhaven.cli import queue as queue_cli
    from mailhaven.spool import MessageSummary, RecipientState

    def messages() -> Iterator[MessageSummary]:
        for n in range(700):  # 4 lines each: 2,800 lines, more than one write's worth
            state = RecipientState(
                0, f"r{n}@x.example", f"r{n}@x.example", (), None, Status.DEFERRED, Hold.NONE,
                False, 1, NOW, Reply(451, "try later", "4.7.1"), None, None,
            )
            yield MessageSummary(f"1K132SF6WGPH{n:03d}", NOW, 1500, "a@b.example", False, (state,))

    class Counting(io.StringIO):
        writes = 0

        def write(self, s: str) -> int:
            self.writes += 1
            return super().write(s)

    monkeypatch.setattr(queue_cli, "list_all", lambda path: messages())
    out = Counting()
    assert queue_cli.print_mailq(tmp_path, out) == 0
    expected = list(queue_cli.mailq_lines(messages()))
    assert len(expected) > queue_cli._LINES_PER_WRITE
    assert out.getvalue() == "\n".join(expected) + "\n"
    assert out.writes == -(-len(expected) // queue_cli._LINES_PER_WRITE)
