"""The SMTP (and LMTP) server session as data: its states, legal transitions and command table.

In: nothing (pure data, built once per mode). Out: `State`, `TRANSITIONS` (checked by the core on
every state change) and `command_table(lmtp)`: for each state where commands are read and each
verb, either `RUN` (the core's handler for the verb runs: syntax, parameters, then usually a
decision event for the application) or the `Reply` that refuses the verb in that state. The
command *sequence* of RFC 5321 §4.1.4 (RFC 2033 §4 for LMTP) lives here and nowhere else; the
tests walk the whole table.

Invariants: every command state answers every verb of `SEQUENCED`; a verb outside it is
unrecognised (500) or obsolete (502) in every state. Refusals here come after the line checks and
the listener-level ones (`smtp_commands.refuse_unavailable`), and before argument syntax, as in
Postfix's smtpd (e.g. `DATA x` before RCPT is "need RCPT", not a syntax error).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from mailhaven.proto import replies as r
from mailhaven.proto.replies import Reply


class State(enum.Enum):
    """Where a session stands; the value names it in logs ("timeout after DATA")."""

    GREETING = "greeting"  # connected; greet() not called yet: input is only buffered
    CONNECTED = "connect"  # greeted; no HELO/EHLO (LHLO) accepted yet
    READY = "helo"  # HELO/EHLO (LHLO) accepted, no transaction
    MAIL = "mail"  # MAIL accepted, no recipient yet
    RCPT = "rcpt"  # one or more recipients accepted
    DATA = "data"  # reading a DATA body
    BDAT = "bdat"  # reading one BDAT chunk (also a refused one: it is read and dropped)
    CHUNKING = "chunking"  # between BDAT chunks of one message
    BODY_END = "end-of-message"  # the body is in; the application's verdict(s) are awaited
    AUTH = "auth"  # reading the client's lines of an AUTH exchange
    STARTTLS = "starttls"  # 220 sent; the adapter does the handshake
    CLOSED = "closed"


S = State
#: Legal state changes (a state may always stay itself), checked on every change.
TRANSITIONS: Mapping[State, frozenset[State]] = {
    S.GREETING: frozenset({S.CONNECTED, S.CLOSED}),
    S.CONNECTED: frozenset({S.READY, S.STARTTLS, S.BDAT, S.CLOSED}),
    S.READY: frozenset({S.MAIL, S.AUTH, S.STARTTLS, S.BDAT, S.CLOSED}),
    S.MAIL: frozenset({S.READY, S.RCPT, S.BDAT, S.CLOSED}),
    S.RCPT: frozenset({S.READY, S.DATA, S.BDAT, S.CLOSED}),
    S.DATA: frozenset({S.BODY_END, S.READY, S.CLOSED}),
    S.BDAT: frozenset({S.CONNECTED, S.READY, S.MAIL, S.RCPT, S.CHUNKING, S.BODY_END, S.CLOSED}),
    S.CHUNKING: frozenset({S.READY, S.BDAT, S.CLOSED}),
    S.BODY_END: frozenset({S.READY, S.CLOSED}),
    S.AUTH: frozenset({S.READY, S.CLOSED}),
    S.STARTTLS: frozenset({S.CONNECTED, S.CLOSED}),
    S.CLOSED: frozenset(),
}

#: States in which a command line is read (the others read a body, AUTH lines, or nothing).
COMMAND_STATES = (S.CONNECTED, S.READY, S.MAIL, S.RCPT, S.CHUNKING)
#: The transaction states: a message is being built (`in_transaction`).
TRANSACTION_STATES = frozenset({S.MAIL, S.RCPT, S.DATA, S.CHUNKING, S.BODY_END})

#: Run the verb's handler (a table entry; any other entry is the refusal to send).
RUN = None
Verdict = Reply | None

#: The verbs the table decides on; every other verb is refused the same way in every state.
SEQUENCED = (
    "HELO", "EHLO", "LHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "HELP",
    "VRFY", "EXPN", "ETRN", "STARTTLS", "AUTH",
)  # fmt: skip


def command_table(lmtp: bool) -> Mapping[State, Mapping[str, Verdict]]:
    """(state, verb) -> verdict for SMTP or, with `lmtp`, LMTP (LHLO replaces HELO/EHLO)."""
    hello_first = r.NEED_LHLO if lmtp else r.NEED_HELO
    ehlo_first = r.NEED_LHLO if lmtp else r.NEED_EHLO
    anytime: dict[str, Verdict] = dict.fromkeys(
        ("RSET", "NOOP", "QUIT", "HELP", "VRFY", "EXPN"), RUN
    )
    if lmtp:  # RFC 2033 §4.1: HELO and EHLO are not LMTP
        anytime |= {"LHLO": RUN, "HELO": r.LMTP_NEEDS_LHLO, "EHLO": r.LMTP_NEEDS_LHLO}
    else:
        anytime |= {"HELO": RUN, "EHLO": RUN, "LHLO": r.UNRECOGNIZED}
    busy = r.IN_TRANSACTION
    per_state: dict[State, dict[str, Verdict]] = {
        S.CONNECTED: {
            "MAIL": hello_first, "RCPT": r.NEED_MAIL, "DATA": r.NEED_MAIL,
            "BDAT": r.NEED_LHLO if lmtp else r.CHUNKING_NOT_OFFERED,
            "ETRN": hello_first, "STARTTLS": RUN, "AUTH": ehlo_first,
        },
        S.READY: {
            "MAIL": RUN, "RCPT": r.NEED_MAIL, "DATA": r.NEED_MAIL, "BDAT": r.NEED_MAIL,
            "ETRN": RUN, "STARTTLS": RUN, "AUTH": RUN,
        },
        S.MAIL: {
            "MAIL": r.NESTED_MAIL, "RCPT": RUN, "DATA": r.NEED_RCPT, "BDAT": r.NEED_RCPT,
            "ETRN": busy, "STARTTLS": busy, "AUTH": busy,
        },
        S.RCPT: {
            "MAIL": r.NESTED_MAIL, "RCPT": RUN, "DATA": RUN, "BDAT": RUN,
            "ETRN": busy, "STARTTLS": busy, "AUTH": busy,
        },
        S.CHUNKING: {
            "MAIL": r.NESTED_MAIL, "RCPT": r.BDAT_IN_PROGRESS, "DATA": r.BDAT_IN_PROGRESS,
            "BDAT": RUN, "ETRN": busy, "STARTTLS": busy, "AUTH": busy,
        },
    }  # fmt: skip
    table = {state: anytime | verbs for state, verbs in per_state.items()}
    for verbs in table.values():
        assert set(verbs) == set(SEQUENCED), "every command state decides every verb"
    return table


SMTP_COMMANDS = command_table(lmtp=False)
LMTP_COMMANDS = command_table(lmtp=True)
