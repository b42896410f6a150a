"""The server core's transition table, walked whole: every (state, verb) pair gets the reply the
table in `proto.smtp_states` defines, for SMTP and LMTP, fed whole and byte by byte."""

from __future__ import annotations

import pytest
from tests.proto.smtp_driver import Run, accept_all, auth_accept_all, drive

from mailhaven.proto import replies as r
from mailhaven.proto import smtp_server_events as ev
from mailhaven.proto.smtp_server import NEED_DATA, ServerConnection, ServerSettings, State
from mailhaven.proto.smtp_states import (
    COMMAND_STATES,
    LMTP_COMMANDS,
    SEQUENCED,
    SMTP_COMMANDS,
    TRANSITIONS,
    command_table,
)


def settings(lmtp: bool) -> ServerSettings:
    """Everything offered, so that only the sequence decides."""
    return ServerSettings(
        hostname="mx.test",
        starttls=True,
        auth_mechanisms=("PLAIN",),
        auth_requires_tls=False,
        etrn=True,
        forbid_unauth_pipelining=False,
        lmtp=lmtp,
    )


def prefix(state: State, lmtp: bool) -> bytes:
    """A transcript that leaves a session in `state`."""
    hello = b"LHLO c.test\r\n" if lmtp else b"EHLO c.test\r\n"
    steps = {
        State.CONNECTED: b"",
        State.READY: hello,
        State.MAIL: hello + b"MAIL FROM:<a@x.test>\r\n",
        State.RCPT: hello + b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n",
        State.CHUNKING: hello + b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 1\r\nx",
    }
    return steps[state]


#: A well-formed line for each verb, so that only the table decides.
LINES = {
    "HELO": b"HELO c.test", "EHLO": b"EHLO c.test", "LHLO": b"LHLO c.test",
    "MAIL": b"MAIL FROM:<a@x.test>", "RCPT": b"RCPT TO:<c@y.test>", "DATA": b"DATA",
    "BDAT": b"BDAT 0", "RSET": b"RSET", "NOOP": b"NOOP", "QUIT": b"QUIT", "HELP": b"HELP",
    "VRFY": b"VRFY postmaster", "EXPN": b"EXPN staff", "ETRN": b"ETRN example.org",
    "STARTTLS": b"STARTTLS", "AUTH": b"AUTH PLAIN",
    "SEND": b"SEND FROM:<a@x.test>", "TURN": b"TURN", "XFOO": b"XFOO bar",
}  # fmt: skip
#: The first reply of each verb when its handler runs and the application accepts.
RUN_CODES = {
    "HELO": 250, "EHLO": 250, "LHLO": 250, "MAIL": 250, "RCPT": 250, "DATA": 354,
    "BDAT": 250, "RSET": 250, "NOOP": 250, "QUIT": 221, "HELP": 214, "VRFY": 252,
    "EXPN": 502, "ETRN": 250, "STARTTLS": 220, "AUTH": 235,
}  # fmt: skip


def play(data: bytes, lmtp: bool, *, bytewise: bool) -> tuple[Run, ServerConnection]:
    conn = ServerConnection(settings(lmtp))
    run = Run(b"")
    conn.greet()
    run.output += conn.data_to_send()
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    for chunk in chunks:
        if not chunk:
            continue
        conn.receive_data(chunk)
        drive(conn, accept_all, run, auth_accept_all)
    return run, conn


def last_reply(output: bytes) -> bytes:
    """The last reply in `output` (all its lines)."""
    lines = output.split(b"\r\n")[:-1]
    start = len(lines) - 1
    while start > 0 and lines[start - 1][3:4] == b"-":
        start -= 1
    return b"\r\n".join(lines[start:]) + b"\r\n"


CASES = [
    (lmtp, state, verb)
    for lmtp in (False, True)
    for state in COMMAND_STATES
    for verb in LINES
]


@pytest.mark.parametrize(("lmtp", "state", "verb"), CASES)
def test_every_state_answers_every_verb(lmtp: bool, state: State, verb: str) -> None:
    before = prefix(state, lmtp)
    ready, conn = play(before, lmtp, bytewise=False)
    assert conn.state is state, ready.text()
    data = before + LINES[verb] + b"\r\n"
    whole, conn = play(data, lmtp, bytewise=False)
    bytewise, _ = play(data, lmtp, bytewise=True)
    assert whole.output == bytewise.output
    assert whole.output.startswith(ready.output)
    answer = whole.output[len(ready.output) :]
    table = LMTP_COMMANDS if lmtp else SMTP_COMMANDS
    verdict = table[state].get(verb, r.NOT_IMPLEMENTED if verb in ("SEND", "TURN") else None)
    if verb == "XFOO":
        verdict = r.UNRECOGNIZED
    if verdict is not None:
        assert answer == verdict.to_bytes(), (state, verb, answer)
        assert conn.state is state  # a refusal changes nothing
        assert not any(isinstance(e, ev.Reset) for e in whole.events[len(ready.events) :])
    else:
        assert int(answer[:3]) == RUN_CODES[verb], (state, verb, answer)


def test_the_table_is_complete_and_its_refusals_are_errors() -> None:
    for lmtp in (False, True):
        table = command_table(lmtp)
        assert set(table) == set(COMMAND_STATES)
        for state, verdicts in table.items():
            assert set(verdicts) == set(SEQUENCED)
            for verb, verdict in verdicts.items():
                assert verdict is None or verdict.code >= 500, (state, verb)


def test_every_state_is_reachable_and_can_end() -> None:
    reachable = {State.GREETING}
    frontier = [State.GREETING]
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()]:
            if nxt not in reachable:
                reachable.add(nxt)
                frontier.append(nxt)
    assert reachable == set(State)
    assert all(State.CLOSED in TRANSITIONS[s] for s in State if s is not State.CLOSED)


@pytest.mark.parametrize("verb", list(LINES))
def test_lines_in_the_other_states_are_not_commands(verb: str) -> None:
    """Where no command is read, a command line is content, an AUTH response or nothing."""
    line = LINES[verb] + b"\r\n"
    hello = b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n"
    # DATA: the line is message content
    run, conn = play(hello + b"DATA\r\n" + line, False, bytewise=False)
    assert conn.state is State.DATA and line.startswith(run.body) and run.body  # CRLF held back
    # BDAT: the chunk's octets are content, whatever they say
    run, conn = play(hello + b"BDAT %d\r\n" % (len(line) + 1) + line, False, bytewise=False)
    assert conn.state is State.BDAT and run.body == line
    # STARTTLS pending: plaintext is dropped unanswered (CVE-2011-0411)
    conn = ServerConnection(settings(False))
    conn.greet()
    conn.receive_data(b"EHLO c.test\r\nSTARTTLS\r\n")
    while not isinstance(event := conn.next_event(), ev.StartTLS):
        assert event is not NEED_DATA
        if isinstance(event, ev.Hello):
            conn.accept()
    conn.data_to_send()
    conn.receive_data(line)
    assert conn.next_event() is NEED_DATA
    assert conn.state is State.STARTTLS and conn.data_to_send() == b""
