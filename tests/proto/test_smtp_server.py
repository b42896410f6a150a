"""Transcript tests for the sans-I/O SMTP server core: every input whole and byte by byte."""

from __future__ import annotations

import pytest
from tests.proto.smtp_driver import Run, converse

from mailhaven.proto import smtp_server_events as ev
from mailhaven.proto.replies import MAX_REPLY_LINE, Reply
from mailhaven.proto.smtp_server import (
    NEED_DATA,
    PAUSED,
    ServerConnection,
    ServerSettings,
    State,
    UsageError,
    Wait,
    transaction_params,
)

EHLO = b"EHLO client.test\r\n"
ENVELOPE = b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n"


def both(data: bytes, **kw: object) -> Run:
    """Run a transcript whole and byte at a time; they must agree exactly."""
    whole = converse(data, **kw)  # type: ignore[arg-type]
    bytewise = converse(data, byte_at_a_time=True, **kw)  # type: ignore[arg-type]
    assert whole.output == bytewise.output
    if not any(isinstance(e, ev.BodyAborted) for e in whole.events):
        # An aborted body may have been streamed in part, depending on chunking: discarded.
        assert whole.body == bytewise.body
    return whole


def next_event(conn: ServerConnection) -> ev.Event | Wait:
    """The next event that is not an `Answered` notice (those only feed the statistics)."""
    while isinstance(event := conn.next_event(), ev.Answered):
        pass
    return event


def no_pipelining_check() -> ServerSettings:
    return ServerSettings(hostname="mx.test", forbid_unauth_pipelining=False)


# ---------------------------------------------------------------- transcripts

TRANSCRIPTS: list[tuple[str, bytes, list[int]]] = [
    ("helo-quit", b"HELO c\r\nQUIT\r\n", [220, 250, 221]),
    ("ehlo", EHLO, [220, 250]),
    ("simple", EHLO + b"MAIL FROM:<a@x.test>\r\n", [220, 250, 250]),
    ("noop-rset", b"NOOP\r\nRSET\r\n", [220, 250, 250]),
    ("unknown", b"FOO bar\r\n", [220, 500]),
    ("lowercase", b"ehlo c\r\nmail from:<a@b.c>\r\nrcpt to:<d@e.f>\r\n", [220, 250, 250, 250]),
    ("rcpt-before-mail", EHLO + b"RCPT TO:<b@y.test>\r\n", [220, 250, 503]),
    ("mail-before-helo", b"MAIL FROM:<a@x.test>\r\n", [220, 503]),
    ("data-without-rcpt", EHLO + b"MAIL FROM:<a@x.test>\r\nDATA\r\n", [220, 250, 250, 503]),
    ("data-without-mail", EHLO + b"DATA\r\n", [220, 250, 503]),
    (
        "nested-mail",
        EHLO + b"MAIL FROM:<a@x.test>\r\nMAIL FROM:<a@x.test>\r\n",
        [220, 250, 250, 503],
    ),
    ("null-sender", EHLO + b"MAIL FROM:<>\r\n", [220, 250, 250]),
    ("null-rcpt", EHLO + b"MAIL FROM:<>\r\nRCPT TO:<>\r\n", [220, 250, 250, 501]),
    ("bare-postmaster", EHLO + b"MAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\n", [220, 250, 250, 250]),
    ("tolerated-space", EHLO + b"MAIL FROM: <a@x.test>\r\n", [220, 250, 250]),
    ("bad-syntax", EHLO + b"MAIL FROM:<a@@x>\r\n", [220, 250, 553]),
    ("missing-bracket", EHLO + b"MAIL FROM:<a@x.test\r\n", [220, 250, 501]),
    ("mail-syntax", EHLO + b"MAIL <a@x.test>\r\n", [220, 250, 501]),
    ("unknown-param", EHLO + b"MAIL FROM:<a@x.test> FOO=1\r\n", [220, 250, 555]),
    ("size-too-big", EHLO + b"MAIL FROM:<a@x.test> SIZE=999999999999\r\n", [220, 250, 552]),
    ("size-ok", EHLO + b"MAIL FROM:<a@x.test> SIZE=1000 BODY=8BITMIME\r\n", [220, 250, 250]),
    ("params-after-helo", b"HELO c\r\nMAIL FROM:<a@x.test> SIZE=10\r\n", [220, 250, 555]),
    (
        "dsn",
        EHLO + b"MAIL FROM:<a@x.test> RET=HDRS ENVID=abc+2Bd\r\n"
        b"RCPT TO:<b@y.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+40y.test\r\n",
        [220, 250, 250, 250],
    ),
    (
        "bad-notify",
        EHLO + b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test> NOTIFY=NEVER,SUCCESS\r\n",
        [220, 250, 250, 501],
    ),
    ("source-route", EHLO + b"MAIL FROM:<@relay.test:a@x.test>\r\n", [220, 250, 250]),
    ("help", b"HELP\r\n", [220, 214]),
    ("help-cmd", b"HELP mail\r\n", [220, 214]),
    ("help-unknown", b"HELP FOO\r\n", [220, 504]),
    ("obsolete", b"SEND FROM:<a@b>\r\nSOML x\r\nSAML x\r\nTURN\r\n", [220, 502, 502, 502, 502]),
    ("vrfy", b"VRFY postmaster\r\n", [220, 252]),
    ("vrfy-noarg", b"VRFY\r\n", [220, 501]),
    ("expn", b"EXPN list\r\n", [220, 502]),
    ("etrn-disabled", EHLO + b"ETRN example.org\r\n", [220, 250, 502]),
    ("starttls-unavailable", EHLO + b"STARTTLS\r\n", [220, 250, 502]),
    ("auth-unavailable", EHLO + b"AUTH PLAIN\r\n", [220, 250, 502]),
    (
        "lf-only-commands",
        b"EHLO c\nMAIL FROM:<a@x.test>\nRCPT TO:<b@y.test>\nQUIT\n",
        [220, 250, 250, 250, 221],
    ),
    ("nul", b"NO\x00OP\r\n", [220, 500]),
    ("bare-cr-command", b"NOOP\rRSET\r\n", [220, 500]),
    ("8bit-command", b"NOOP \xc3\xa9\r\n", [220, 500]),
    ("8bit-no-smtputf8", EHLO + "MAIL FROM:<é@x.test>\r\n".encode(), [220, 250, 553]),
    (
        "8bit-smtputf8",
        EHLO + "MAIL FROM:<é@x.test> SMTPUTF8\r\nRCPT TO:<ü@ÿ.test>\r\n".encode(),
        [220, 250, 250, 250],
    ),
    ("bad-utf8", EHLO + b"MAIL FROM:<\xff@x.test> SMTPUTF8\r\n", [220, 250, 500]),
    ("ehlo-noarg", b"EHLO\r\n", [220, 501]),
    ("rset-arg", b"RSET now\r\n", [220, 501]),
    ("data-arg", EHLO + ENVELOPE + b"DATA now\r\n", [220, 250, 250, 250, 501]),
]


@pytest.mark.parametrize(("name", "data", "codes"), TRANSCRIPTS, ids=[t[0] for t in TRANSCRIPTS])
def test_transcript(name: str, data: bytes, codes: list[int]) -> None:
    run = both(data, settings=no_pipelining_check())
    assert run.codes == codes, run.text()


def test_greeting_and_ehlo_keywords() -> None:
    run = converse(EHLO)
    text = run.text()
    assert text.startswith("220 mx.test ESMTP mailhaven\r\n")
    for keyword in (
        "PIPELINING",
        "SIZE 36700160",
        "ENHANCEDSTATUSCODES",
        "8BITMIME",
        "DSN",
        "SMTPUTF8",
        "CHUNKING",
    ):
        assert f"250-{keyword}\r\n" in text or f"250 {keyword}\r\n" in text
    assert "STARTTLS" not in text and "AUTH" not in text


def test_enhanced_codes_on_every_reply_but_greeting_and_ehlo() -> None:
    run = converse(EHLO + ENVELOPE + b"NOOP\r\nFOO\r\nQUIT\r\n", settings=no_pipelining_check())
    lines = run.text().split("\r\n")
    assert lines[0].startswith("220 mx.test")
    enhanced = [line for line in lines if line[:3] in ("250", "500", "221") and line[3:4] != "-"]
    assert any("2.1.0" in line for line in enhanced)
    assert "250 2.1.5 Ok" in lines
    assert "500 5.5.2 Error: command not recognized" in lines
    assert "221 2.0.0 Bye" in lines


ALL_COMMANDS = (
    "HELO", "EHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "VRFY", "EXPN",
    "HELP", "STARTTLS", "AUTH", "ETRN",
)  # fmt: skip


def help_commands(settings: ServerSettings) -> set[str]:
    text = converse(b"HELP\r\n", settings=settings).text()
    names = text.split("\r\n")[2]
    assert names.startswith("214-2.0.0 "), text
    return set(names.removeprefix("214-2.0.0 ").split())


def test_help_lists_every_command_that_works_here() -> None:
    everything = ServerSettings(
        hostname="mx.test", starttls=True, auth_mechanisms=("PLAIN",), etrn=True
    )
    assert help_commands(everything) == set(ALL_COMMANDS)


def test_help_leaves_out_commands_that_answer_502_here() -> None:
    # no certificate, no AUTH, no held domains
    mx = ServerSettings(hostname="mx.test", forbid_unauth_pipelining=False)
    listed = help_commands(mx)
    assert listed == set(ALL_COMMANDS) - {"STARTTLS", "AUTH", "ETRN"}
    for verb in ("STARTTLS", "AUTH", "ETRN"):
        run = converse(b"EHLO c\r\n" + verb.encode() + b" x\r\n", settings=mx)
        assert run.codes[-1] == 502, verb  # what HELP stopped promising
        why = converse(b"HELP " + verb.encode() + b"\r\n", settings=mx).text()
        assert "214 2.0.0 " in why and "not available here" in why, why
    implicit_tls = ServerSettings(hostname="mx.test", starttls=True, tls_on_connect=True)
    assert "STARTTLS" not in help_commands(implicit_tls)


# ---------------------------------------------------------------- DATA

MESSAGE = b"Subject: hi\r\n\r\nline one\r\n..dotted\r\n.\r\n"


def test_data_dot_unstuffing_and_queue_reply() -> None:
    run = both(EHLO + ENVELOPE + b"DATA\r\n", settings=no_pipelining_check())
    run = both(
        EHLO + b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n", settings=no_pipelining_check()
    )
    conn_run = converse(
        b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n" + MESSAGE + b"QUIT\r\n",
        settings=no_pipelining_check(),
    )
    assert conn_run.codes == [220, 250, 250, 250, 354, 250, 221]
    assert conn_run.body == b"Subject: hi\r\n\r\nline one\r\n.dotted\r\n"
    assert b"250 2.0.0 Ok: queued as TEST" in conn_run.output
    assert run.codes == [220, 250, 250, 250]


def data_session(body: bytes, **kw: object) -> Run:
    return both(
        EHLO + ENVELOPE + b"DATA\r\n" + body + b"NOOP\r\n",
        settings=kw.pop("settings", no_pipelining_check()),  # type: ignore[arg-type]
        **kw,
    )


def test_empty_message() -> None:
    run = data_session(b".\r\n")
    assert run.codes[-2:] == [250, 250]
    assert run.body == b""
    assert any(isinstance(e, ev.BodyEnd) and e.size == 0 for e in run.events)


def test_leading_dot_line() -> None:
    run = data_session(b"..leading\r\n.\r\n")
    assert run.body == b".leading\r\n"


@pytest.mark.parametrize(
    "smuggle",
    [
        b"\n.\n",
        b"\n.\r\n",
        b"\r.\r\n",
        b"\r\n.\n",
        b"\r\n.\r",
        b"\n.\r",
        b"\r\n\r.\r\n",
    ],
)
def test_smuggling_variants_never_end_data_and_taint_the_message(smuggle: bytes) -> None:
    hidden = b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\nspoof\r\n"
    run = data_session(b"Subject: a\r\n\r\nbody" + smuggle + hidden + b".\r\n")
    # Exactly one message framed, and it is refused: nothing smuggled is seen as commands.
    assert run.codes == [220, 250, 250, 250, 354, 554, 250], run.text()
    assert not any(isinstance(e, ev.BodyEnd) for e in run.events)
    assert any(isinstance(e, ev.BodyAborted) for e in run.events)
    assert sum(isinstance(e, ev.MailFrom) for e in run.events) == 1


def test_oversize_data_read_to_end_then_552_and_session_usable() -> None:
    settings = ServerSettings(
        hostname="mx.test", max_message_size=100, forbid_unauth_pipelining=False
    )
    body = b"x" * 70 + b"\r\n" + b"y" * 70 + b"\r\n.\r\n"
    run = data_session(body, settings=settings)
    assert run.codes == [220, 250, 250, 250, 354, 552, 250]
    assert b"552 5.3.4" in run.output
    # After the refusal a new transaction works.
    run2 = converse(
        EHLO + ENVELOPE + b"DATA\r\n" + body + ENVELOPE + b"DATA\r\nsmall\r\n.\r\n",
        settings=settings,
    )
    assert run2.codes == [220, 250, 250, 250, 354, 552, 250, 250, 354, 250]


def test_long_lines_are_accepted_unchanged() -> None:
    line = b"z" * 5000 + b"\r\n"
    run = data_session(line + b".\r\n")
    assert run.body == line


def test_data_then_pipelined_commands() -> None:
    data = EHLO + ENVELOPE + b"DATA\r\n"
    conn = ServerConnection(ServerSettings(hostname="mx.test"))
    conn.greet()
    run = Run(b"")
    from tests.proto.smtp_driver import accept_all, drive

    for part in (EHLO, ENVELOPE, b"DATA\r\n", b"hello\r\n.\r\nMAIL FROM:<a@x.test>\r\nRSET\r\n"):
        conn.receive_data(part)
        drive(conn, accept_all, run)
    assert data
    assert run.codes == [220, 250, 250, 250, 354, 250, 250, 250]


# ---------------------------------------------------------------- BDAT


def test_bdat_chunks_and_last() -> None:
    run = both(
        EHLO + ENVELOPE + b"BDAT 5\r\nabc\r\nBDAT 7 LAST\r\ndef\r\n\r\nQUIT\r\n",
        settings=no_pipelining_check(),
    )
    assert run.codes == [220, 250, 250, 250, 250, 250, 221], run.text()
    assert run.body == b"abc\r\ndef\r\n\r\n"
    assert b"250 2.0.0 Ok: 5 octets received" in run.output


def test_bdat_zero_last() -> None:
    run = both(
        EHLO + ENVELOPE + b"BDAT 6\r\nhello\nBDAT 0 LAST\r\n", settings=no_pipelining_check()
    )
    # The bare LF taints the message: that chunk and the LAST one are refused.
    assert run.codes == [220, 250, 250, 250, 554, 554]


def test_bdat_without_transaction_consumes_its_data() -> None:
    run = both(EHLO + b"BDAT 10\r\nQUIT\r\nQUIT\r\nNOOP\r\n", settings=no_pipelining_check())
    # The 10 octets "QUIT\r\nQUIT" are data, never commands; the chunk is refused.
    assert run.codes == [220, 250, 503, 500, 250], run.text()


def test_bdat_bad_size_closes() -> None:
    run = both(EHLO + b"BDAT x\r\nNOOP\r\n", settings=no_pipelining_check())
    assert run.codes == [220, 250, 501]
    assert any(isinstance(e, ev.Closed) for e in run.events)


def test_bdat_then_data_is_refused() -> None:
    run = both(EHLO + ENVELOPE + b"BDAT 3\r\nabcDATA\r\n", settings=no_pipelining_check())
    assert run.codes == [220, 250, 250, 250, 250, 503]


def test_bdat_oversize() -> None:
    settings = ServerSettings(
        hostname="mx.test", max_message_size=5, forbid_unauth_pipelining=False
    )
    run = both(EHLO + ENVELOPE + b"BDAT 4\r\nabcdBDAT 4 LAST\r\nefgh" + ENVELOPE, settings=settings)
    assert run.codes == [220, 250, 250, 250, 250, 552, 250, 250]


# ---------------------------------------------------------------- limits and errors


def test_too_many_recipients() -> None:
    settings = ServerSettings(
        hostname="mx.test", max_recipients=100, forbid_unauth_pipelining=False
    )
    rcpts = b"".join(b"RCPT TO:<r%d@y.test>\r\n" % i for i in range(101))
    run = converse(EHLO + b"MAIL FROM:<a@x.test>\r\n" + rcpts, settings=settings)
    assert run.codes[-1] == 452
    assert run.codes.count(250) == 102  # EHLO + MAIL + 100 RCPT
    assert b"452 4.5.3" in run.output


def test_recipients_past_the_limit_are_not_errors_until_the_overshoot_limit() -> None:
    # 1,100 pipelined RCPTs (a big mailing) against a limit of 100: 1,000 answered 452 and the
    # session goes on to DATA; Postfix's smtpd_recipient_overshoot_limit, not 421.
    settings = ServerSettings(
        hostname="mx.test", max_recipients=100, hard_error_limit=20, forbid_unauth_pipelining=False
    )
    rcpts = b"".join(b"RCPT TO:<r%d@y.test>\r\n" % i for i in range(1100))
    run = converse(
        EHLO + b"MAIL FROM:<a@x.test>\r\n" + rcpts + b"DATA\r\n", settings=settings
    )
    assert run.codes.count(452) == 1000
    assert 421 not in run.codes
    assert run.codes[-1] == 354


def test_overshooting_far_past_the_limit_counts_as_errors() -> None:
    settings = ServerSettings(
        hostname="mx.test", max_recipients=100, hard_error_limit=20, forbid_unauth_pipelining=False
    )
    rcpts = b"".join(b"RCPT TO:<r%d@y.test>\r\n" % i for i in range(100 + 1000 + 20))
    run = converse(EHLO + b"MAIL FROM:<a@x.test>\r\n" + rcpts, settings=settings)
    assert run.codes[-1] == 421


def test_overlong_command_line() -> None:
    run = both(b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n", settings=no_pipelining_check())
    assert run.codes == [220, 500, 250]


def test_huge_line_without_newline_is_discarded() -> None:
    run = converse(b"X" * 100_000 + b"\r\nNOOP\r\n", settings=no_pipelining_check())
    assert run.codes == [220, 500, 250]


@pytest.mark.parametrize("verb", [b"MAIL FROM:<a@x.test>", b"RCPT TO:<b@y.test>"])
def test_unknown_parameter_reply_stays_within_the_reply_line_limit(verb: bytes) -> None:
    # Found by the protocol fuzzer: the reply quoted the whole keyword, up to ~1000 octets.
    mail = b"" if verb.startswith(b"MAIL") else b"MAIL FROM:<a@x.test>\r\n"
    run = both(EHLO + mail + verb + b" " + b"X" * 900 + b"=1\r\n", settings=no_pipelining_check())
    assert run.codes[-1] == 555
    last = run.output.split(b"\r\n")[-2]
    assert len(last) + 2 <= MAX_REPLY_LINE, len(last)
    assert last.startswith(b"555 5.5.4 Error: unsupported ") and b" XXXX" in last


def test_local_part_too_long() -> None:
    run = both(EHLO + b"MAIL FROM:<" + b"a" * 65 + b"@x.test>\r\n", settings=no_pipelining_check())
    assert run.codes == [220, 250, 501]


def test_error_budget_disconnects() -> None:
    settings = ServerSettings(
        hostname="mx.test", hard_error_limit=3, forbid_unauth_pipelining=False
    )
    run = converse(b"FOO\r\nFOO\r\nFOO\r\nNOOP\r\n", settings=settings)
    assert run.codes == [220, 500, 500, 500, 421]
    assert isinstance(run.events[-1], ev.Closed)


def test_pipelining_after_group_ender_is_refused_by_default() -> None:
    run = converse(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\n")
    assert run.codes == [220, 554]
    assert isinstance(run.events[-1], ev.Closed)


def test_pipelined_group_is_answered_in_order() -> None:
    conn = ServerConnection(ServerSettings(hostname="mx.test"))
    conn.greet()
    run = Run(conn.data_to_send())
    from tests.proto.smtp_driver import accept_all, drive

    conn.receive_data(EHLO)
    drive(conn, accept_all, run)
    conn.receive_data(
        b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n"
    )
    drive(conn, accept_all, run)
    assert run.codes == [220, 250, 250, 250, 250, 354]


def test_early_talker_refused() -> None:
    run = converse(b"EHLO c\r\n", greet_first=False)
    assert run.codes == [554]
    assert isinstance(run.events[-1], ev.Closed)


def test_policy_refusals_keep_session() -> None:
    def refuse_rcpt(event: ev.Event) -> Reply | None:
        if isinstance(event, ev.RcptTo) and event.address.startswith("bad"):
            return Reply(550, "User unknown", "5.1.1")
        from tests.proto.smtp_driver import accept_all

        return accept_all(event)

    run = converse(
        EHLO + b"MAIL FROM:<a@x.test>\r\nRCPT TO:<bad@y.test>\r\nRCPT TO:<good@y.test>\r\nDATA\r\n",
        policy=refuse_rcpt,
        settings=no_pipelining_check(),
    )
    assert run.codes == [220, 250, 250, 550, 250, 354]


def test_eof_mid_data_closes() -> None:
    run = converse(EHLO + ENVELOPE + b"DATA\r\npartial", eof=True, settings=no_pipelining_check())
    assert isinstance(run.events[-1], ev.Closed)
    assert not any(isinstance(e, ev.BodyEnd) for e in run.events)


# ---------------------------------------------------------------- STARTTLS and AUTH


def tls_settings() -> ServerSettings:
    return ServerSettings(
        hostname="mx.test",
        starttls=True,
        auth_mechanisms=("PLAIN", "LOGIN"),
        forbid_unauth_pipelining=False,
    )


def test_starttls_discards_pipelined_plaintext_and_forgets_ehlo() -> None:
    run = converse(EHLO + b"STARTTLS\r\nNOOP\r\nMAIL FROM:<a@x.test>\r\n", settings=tls_settings())
    # NOOP and MAIL arrived in the same packet as STARTTLS: never answered.
    assert run.codes == [220, 250, 220]
    assert any(isinstance(e, ev.StartTLS) for e in run.events)


def test_after_tls_ehlo_is_required_again_and_auth_offered() -> None:
    conn = ServerConnection(tls_settings())
    conn.greet()
    run = Run(conn.data_to_send())
    from tests.proto.smtp_driver import accept_all, drive

    for part in (EHLO, b"STARTTLS\r\n", b"MAIL FROM:<a@x.test>\r\n", EHLO, b"STARTTLS\r\n"):
        conn.receive_data(part)
        drive(conn, accept_all, run)
    text = run.text()
    assert run.codes == [220, 250, 220, 503, 250, 554]
    assert "AUTH PLAIN LOGIN" in text
    assert text.count("STARTTLS") == 1  # only before TLS


def test_auth_before_tls_refused() -> None:
    run = converse(EHLO + b"AUTH PLAIN AGFAYg==\r\n", settings=tls_settings())
    assert run.codes == [220, 250, 538]


def test_auth_exchange_with_challenge() -> None:
    settings = ServerSettings(hostname="mx.test", tls_on_connect=True, auth_mechanisms=("LOGIN",))
    conn = ServerConnection(settings)
    conn.greet()
    out = conn.data_to_send()
    conn.receive_data(EHLO)
    assert isinstance(next_event(conn), ev.Hello)
    conn.accept()
    conn.receive_data(b"AUTH LOGIN\r\n")
    start = next_event(conn)
    assert isinstance(start, ev.AuthStart) and start.mechanism == "LOGIN"
    conn.auth_challenge("VXNlcm5hbWU6")
    conn.receive_data(b"dXNlcg==\r\n")
    resp = next_event(conn)
    assert isinstance(resp, ev.AuthResponse) and resp.line == "dXNlcg=="
    conn.auth_finish(Reply(235, "Authentication successful", "2.7.0"), "user")
    out += conn.data_to_send()
    assert b"334 VXNlcm5hbWU6\r\n" in out
    assert b"235 2.7.0 Authentication successful\r\n" in out
    assert conn.authenticated == "user"


def _login_then(response: bytes, *, pieces: int) -> tuple[bytes, list[ev.Event], ServerConnection]:
    """EHLO, AUTH LOGIN (answered with a challenge), then `response` in `pieces` chunks."""
    settings = ServerSettings(hostname="mx.test", tls_on_connect=True, auth_mechanisms=("LOGIN",))
    conn = ServerConnection(settings)
    conn.greet()
    conn.receive_data(EHLO)
    assert isinstance(next_event(conn), ev.Hello)
    conn.accept()
    conn.receive_data(b"AUTH LOGIN\r\n")
    assert isinstance(next_event(conn), ev.AuthStart)
    conn.auth_challenge("VXNlcm5hbWU6")
    conn.data_to_send()
    size = -(-len(response) // pieces)
    events: list[ev.Event] = []
    for i in range(0, len(response), size):
        conn.receive_data(response[i : i + size])
        while (event := next_event(conn)) is not NEED_DATA:
            assert event is not PAUSED
            events.append(event)
            if isinstance(event, ev.AuthResponse):
                conn.auth_finish(Reply(535, "Authentication failed", "5.7.8"), None)
    return conn.data_to_send(), events, conn


@pytest.mark.parametrize("pieces", [1, 2, 50])
def test_overlong_auth_response_gets_one_reply_however_it_arrives(pieces: int) -> None:
    # Found by the protocol fuzzer: split so that the buffer overflowed before the LF, the line
    # was answered "500 line too long" and then handed on as an empty AuthResponse too (two
    # replies to one line, and a bogus empty credential for the application).
    out, events, conn = _login_then(b"x" * 20_000 + b"\r\nNOOP\r\n", pieces=pieces)
    assert out == b"500 5.5.6 Error: authentication line too long\r\n250 2.0.0 Ok\r\n"
    assert not any(isinstance(e, ev.AuthResponse) for e in events)
    assert conn.authenticated is None


@pytest.mark.parametrize("pieces", [1, 2, 50])
def test_overlong_command_counts_once_however_it_arrives(pieces: int) -> None:
    conn = ServerConnection(no_pipelining_check())
    conn.greet()
    data = b"AUTH " + b"x" * 20_000 + b"\r\nNOOP\r\n"
    answered: list[tuple[str, int]] = []
    size = -(-len(data) // pieces)
    for i in range(0, len(data), size):
        conn.receive_data(data[i : i + size])
        while (event := conn.next_event()) is not NEED_DATA:
            assert isinstance(event, ev.Answered)
            answered.append((event.command, event.reply.code))
    assert conn.data_to_send().endswith(b"500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n")
    assert conn.command_count == 2
    assert answered == [("auth", 500), ("noop", 250)]


def test_unknown_auth_mechanism() -> None:
    settings = ServerSettings(
        hostname="mx.test",
        tls_on_connect=True,
        auth_mechanisms=("PLAIN",),
        forbid_unauth_pipelining=False,
    )
    run = converse(EHLO + b"AUTH CRAM-MD5\r\n", settings=settings)
    assert run.codes == [220, 250, 504]


def test_etrn_enabled() -> None:
    settings = ServerSettings(hostname="mx.test", etrn=True, forbid_unauth_pipelining=False)
    run = converse(EHLO + b"ETRN example.org\r\nETRN\r\n", settings=settings)
    assert run.codes == [220, 250, 250, 500]
    assert "ETRN" in run.text()


def test_stats_for_disconnect_log() -> None:
    conn_run = converse(
        EHLO + ENVELOPE + b"RCPT TO:<>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n",
        settings=no_pipelining_check(),
    )
    assert conn_run.codes == [220, 250, 250, 250, 501, 354, 250, 221]
    answered = [(e.command, e.reply.code) for e in conn_run.events if isinstance(e, ev.Answered)]
    # DATA counts once, with the reply to the end of the message (Postfix: data=1, not 354)
    assert answered == [("ehlo", 250), ("mail", 250), ("rcpt", 250), ("rcpt", 501),
                        ("data", 250), ("quit", 221)]  # fmt: skip


def test_commands_per_session_limit() -> None:
    settings = ServerSettings(hostname="mx.test", max_commands=3, forbid_unauth_pipelining=False)
    run = converse(b"NOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\n", settings=settings)
    assert run.codes == [220, 250, 250, 250, 421]
    assert isinstance(run.events[-1], ev.Closed)


@pytest.mark.parametrize(
    ("before", "target", "answer"),
    [
        (EHLO + b"MAIL FROM:<a@x.test>\r\n", ev.MailFrom, "accept"),
        (EHLO + ENVELOPE, ev.RcptTo, "accept"),
        (EHLO + b"AUTH PLAIN\r\n", ev.AuthStart, "auth_finish"),
        (EHLO + b"AUTH PLAIN\r\n", ev.AuthStart, "auth_challenge"),
        (EHLO + ENVELOPE + b"DATA\r\nx\r\n.\r\n", ev.BodyEnd, "respond"),
    ],
)
def test_an_answer_after_the_client_left_changes_nothing(
    before: bytes, target: type, answer: str
) -> None:
    """The client hangs up while the application decides: the late answer is harmless."""
    settings = ServerSettings(
        hostname="mx.test", auth_mechanisms=("PLAIN",), auth_requires_tls=False,
        forbid_unauth_pipelining=False,
    )  # fmt: skip
    conn = ServerConnection(settings)
    conn.greet()
    conn.receive_data(before)
    while not isinstance(event := next_event(conn), target):
        assert event is not NEED_DATA
        if isinstance(event, ev.Decision):
            conn.accept()
    conn.receive_data(b"")  # the client is gone
    match answer:
        case "accept":
            conn.accept()
        case "auth_finish":
            conn.auth_finish(Reply(235, "ok", "2.7.0"), "user")
        case "auth_challenge":
            conn.auth_challenge("")
        case "respond":
            conn.respond(Reply(250, "Ok: queued", "2.0.0"))
    assert conn.closed


def test_the_application_misusing_the_core_is_told_and_can_still_answer() -> None:
    settings = ServerSettings(hostname="mx.test", starttls=True, forbid_unauth_pipelining=False)
    conn = ServerConnection(settings)
    with pytest.raises(UsageError):
        conn.tls_established()
    with pytest.raises(UsageError):
        conn.accept()  # nothing outstanding
    conn.greet()
    with pytest.raises(UsageError):
        conn.greet()
    conn.receive_data(b"EHLO c.test\r\nVRFY postmaster\r\n")
    assert isinstance(next_event(conn), ev.Hello)
    with pytest.raises(UsageError):
        conn.auth_finish(Reply(235, "ok", "2.7.0"), "user")
    with pytest.raises(UsageError):
        conn.auth_challenge("")
    conn.accept()  # the Hello is still outstanding after the misuse
    assert isinstance(next_event(conn), ev.Verify)
    with pytest.raises(UsageError):
        conn.accept()  # no standard answer to VRFY
    conn.respond(Reply(252, "Cannot VRFY user", "2.5.2"))
    assert conn.data_to_send().endswith(b"252 2.5.2 Cannot VRFY user\r\n")
    assert not conn.awaiting_decision
    with pytest.raises(UsageError):
        transaction_params(conn)


def test_positive_answers_through_respond_keep_the_transaction() -> None:
    conn = ServerConnection(no_pipelining_check())
    conn.greet()
    conn.receive_data(b"EHLO c.test\r\n" + ENVELOPE)
    assert isinstance(next_event(conn), ev.Hello)
    conn.respond(Reply(250, "mx.test at your service"))
    assert isinstance(next_event(conn), ev.MailFrom)
    conn.respond(Reply(250, "sender fine", "2.1.0"))
    assert isinstance(next_event(conn), ev.RcptTo)
    conn.respond(Reply(250, "recipient fine", "2.1.5"))
    assert conn.state is State.RCPT and len(conn.recipients) == 1
    assert transaction_params(conn).body == "7BIT"
    out = conn.data_to_send()
    assert b"250-mx.test at your service\r\n250-PIPELINING\r\n" in out
    conn.close_with(Reply(421, "mx.test Service shutting down", "4.3.2"))
    conn.close_with(Reply(421, "twice", "4.3.2"))  # once closed, nothing more is said
    assert conn.data_to_send() == b"421 4.3.2 mx.test Service shutting down\r\n"
    assert conn.closed and not conn.has_output


def test_refusals_inside_allowed_commands() -> None:
    settings = ServerSettings(
        hostname="mx.test", starttls=True, auth_mechanisms=("PLAIN",),
        auth_requires_tls=False, forbid_unauth_pipelining=False,
    )  # fmt: skip
    run = both(
        b"STARTTLS now\r\nHELO c.test\r\nAUTH PLAIN\r\nEHLO c.test\r\nAUTH PLAIN\r\nAUTH PLAIN\r\n",
        settings=settings,
    )
    # STARTTLS with an argument; AUTH after HELO; a second AUTH once authenticated
    assert run.codes == [220, 501, 250, 503, 250, 235, 503]


def test_the_data_gate_refuses_the_first_chunk_only() -> None:
    calls: list[int] = []

    def gate() -> Reply | None:
        calls.append(1)
        return Reply(452, "Insufficient system storage", "4.3.1") if len(calls) == 1 else None

    conn = ServerConnection(no_pipelining_check())
    conn.data_gate = gate
    conn.greet()
    conn.receive_data(EHLO + ENVELOPE + b"BDAT 2\r\nxyBDAT 1\r\nzBDAT 1 LAST\r\nw")
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, ev.Decision):
            conn.accept() if not isinstance(event, ev.BodyEnd) else conn.respond(
                Reply(250, "queued", "2.0.0")
            )
    assert b"452 4.3.1 Insufficient system storage\r\n250 2.0.0 Ok: 1 octets received\r\n" in (
        conn.data_to_send()
    )
    assert len(calls) == 2  # asked for the first accepted chunk, not for the next ones
    assert b"".join(e.data for e in events if isinstance(e, ev.BodyData)) == b"zw"
