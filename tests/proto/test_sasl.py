"""SASL PLAIN/LOGIN step machine: no event loop, every client line is hostile."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailhaven.proto.sasl import (
    LOGIN_PASSWORD_CHALLENGE,
    LOGIN_USERNAME_CHALLENGE,
    MAX_RESPONSE_LINE,
    Challenge,
    Credentials,
    Failure,
    FailureReason,
    SaslExchange,
    SaslStateError,
    smtp_reply,
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def plain(authzid: str, authcid: str, password: str) -> str:
    return b64(f"{authzid}\0{authcid}\0{password}".encode())


# -- PLAIN ---------------------------------------------------------------------------------


def test_plain_with_initial_response() -> None:
    step = SaslExchange().start("PLAIN", plain("", "alice", "s3cret"))
    assert step == Credentials("PLAIN", "alice", "s3cret", None)
    assert isinstance(step, Credentials)
    assert step.identity == "alice"


def test_plain_without_initial_response_sends_empty_challenge() -> None:
    ex = SaslExchange()
    step = ex.start("plain")  # mechanism names are matched case-insensitively
    assert step == Challenge(b"")
    assert isinstance(step, Challenge)
    assert step.encoded == ""
    assert ex.respond(plain("", "alice", "pw")) == Credentials("PLAIN", "alice", "pw")
    assert ex.finished


def test_plain_bytes_lines_are_accepted() -> None:
    ex = SaslExchange()
    ex.start("PLAIN")
    assert ex.respond(plain("", "bob", "pw").encode()) == Credentials("PLAIN", "bob", "pw")


def test_plain_authzid_equal_to_authcid_is_fine() -> None:
    step = SaslExchange().start("PLAIN", plain("alice", "alice", "pw"))
    assert step == Credentials("PLAIN", "alice", "pw", "alice")


def test_plain_other_authzid_refused_by_default() -> None:
    step = SaslExchange().start("PLAIN", plain("bob", "alice", "pw"))
    assert step == Failure(FailureReason.AUTHZID_NOT_ALLOWED, "bob")
    assert isinstance(step, Failure)
    assert smtp_reply(step).code == 535


def test_plain_other_authzid_allowed_when_asked() -> None:
    step = SaslExchange(allow_authzid=True).start("PLAIN", plain("bob", "alice", "pw"))
    assert isinstance(step, Credentials)
    assert (step.authzid, step.authcid, step.identity) == ("bob", "alice", "bob")


def test_plain_utf8_identities() -> None:
    step = SaslExchange().start("PLAIN", plain("", "jörg@exämple.org", "pässwörd"))
    assert step == Credentials("PLAIN", "jörg@exämple.org", "pässwörd")


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"alice\0pw",  # one NUL
        b"\0alice\0pw\0extra",  # three NULs
        b"\0\0pw",  # empty authcid
        b"\0alice\0",  # empty password
        b"\0al\xffice\0pw",  # not UTF-8
    ],
)
def test_plain_malformed_messages(message: bytes) -> None:
    step = SaslExchange().start("PLAIN", b64(message) if message else "=")
    assert isinstance(step, Failure)
    assert step.reason is FailureReason.MALFORMED
    assert smtp_reply(step).enhanced == "5.7.8"


def test_equals_is_an_empty_initial_response() -> None:
    # RFC 4954 §4: "=" is a zero-length initial response, which PLAIN cannot accept.
    step = SaslExchange().start("PLAIN", "=")
    assert isinstance(step, Failure)
    assert step.reason is FailureReason.MALFORMED


# -- LOGIN ---------------------------------------------------------------------------------


def test_login_full_exchange() -> None:
    ex = SaslExchange()
    first = ex.start("LOGIN")
    assert first == Challenge(LOGIN_USERNAME_CHALLENGE)
    assert isinstance(first, Challenge)
    assert first.encoded == "VXNlcm5hbWU6"  # what every LOGIN client expects
    second = ex.respond(b64(b"alice"))
    assert second == Challenge(LOGIN_PASSWORD_CHALLENGE)
    assert isinstance(second, Challenge)
    assert second.encoded == "UGFzc3dvcmQ6"
    assert ex.respond(b64(b"pw")) == Credentials("LOGIN", "alice", "pw")
    assert ex.finished


def test_login_with_initial_response_skips_username_prompt() -> None:
    ex = SaslExchange()
    assert ex.start("LOGIN", b64(b"alice")) == Challenge(LOGIN_PASSWORD_CHALLENGE)
    assert ex.respond(b64(b"pw")) == Credentials("LOGIN", "alice", "pw")


def test_login_empty_username_fails() -> None:
    ex = SaslExchange()
    ex.start("LOGIN")
    step = ex.respond("")
    assert isinstance(step, Failure)
    assert step.reason is FailureReason.MALFORMED


def test_login_cancel_at_password() -> None:
    ex = SaslExchange()
    ex.start("LOGIN")
    ex.respond(b64(b"alice"))
    step = ex.respond("*")
    assert step == Failure(FailureReason.ABORTED)
    assert isinstance(step, Failure)
    reply = smtp_reply(step)
    assert (reply.code, reply.enhanced, reply.text) == (501, "5.0.0", "Authentication aborted")


# -- failures shared by all mechanisms -------------------------------------------------------


def test_unsupported_mechanism() -> None:
    step = SaslExchange().start("CRAM-MD5")
    assert isinstance(step, Failure)
    assert step.reason is FailureReason.UNSUPPORTED_MECHANISM
    assert (smtp_reply(step).code, smtp_reply(step).enhanced) == (504, "5.5.4")


def test_mechanism_not_offered_is_unsupported() -> None:
    step = SaslExchange(offered=("PLAIN",)).start("LOGIN")
    assert isinstance(step, Failure)
    assert step.reason is FailureReason.UNSUPPORTED_MECHANISM


@pytest.mark.parametrize("bad", ["not base64!", "YWJj=", "YW=j", "YR==", "YW Jj", "YWJ", "é"])
def test_bad_base64(bad: str) -> None:
    ex = SaslExchange()
    ex.start("PLAIN")
    step = ex.respond(bad)
    assert isinstance(step, Failure)
    assert step.reason is FailureReason.BAD_BASE64
    reply = smtp_reply(step)
    assert (reply.code, reply.enhanced) == (501, "5.5.2")


def test_bad_base64_in_initial_response() -> None:
    step = SaslExchange().start("PLAIN", "%%%")
    assert isinstance(step, Failure)
    assert step.reason is FailureReason.BAD_BASE64


def test_line_limit_is_inclusive() -> None:
    # A valid base64 line of exactly the limit (a multiple of 4) is accepted...
    ex = SaslExchange()
    ex.start("LOGIN")
    at_limit = "QUFB" * (MAX_RESPONSE_LINE // 4)
    assert ex.respond(at_limit) == Challenge(LOGIN_PASSWORD_CHALLENGE)
    # ...one octet more is refused before decoding.
    ex = SaslExchange()
    ex.start("LOGIN")
    step = ex.respond("A" * (MAX_RESPONSE_LINE + 1))
    assert isinstance(step, Failure)
    assert step.reason is FailureReason.LINE_TOO_LONG
    assert (smtp_reply(step).code, smtp_reply(step).enhanced) == (500, "5.5.6")


def test_initial_response_over_limit() -> None:
    step = SaslExchange().start("PLAIN", "A" * (MAX_RESPONSE_LINE + 4))
    assert isinstance(step, Failure)
    assert step.reason is FailureReason.LINE_TOO_LONG


def test_finished_exchange_refuses_more_input() -> None:
    ex = SaslExchange()
    ex.start("PLAIN", plain("", "a", "b"))
    with pytest.raises(SaslStateError):
        ex.respond(plain("", "a", "b"))
    with pytest.raises(SaslStateError):
        ex.start("PLAIN")


def test_respond_before_start_is_a_caller_bug() -> None:
    with pytest.raises(SaslStateError):
        SaslExchange().respond("*")


def test_failure_finishes_the_exchange() -> None:
    ex = SaslExchange()
    ex.start("NOPE")
    assert ex.finished
    with pytest.raises(SaslStateError):
        ex.respond("*")


def test_password_is_not_in_repr() -> None:
    creds = Credentials("PLAIN", "alice", "hunter2")
    assert "hunter2" not in repr(creds)


def test_every_failure_reason_has_a_reply() -> None:
    for reason in FailureReason:
        reply = smtp_reply(Failure(reason))
        assert reply.is_permanent
        assert reply.enhanced is not None


# -- properties ----------------------------------------------------------------------------

safe_text = st.text(
    alphabet=st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]),
    min_size=1,
    max_size=64,
)


@given(authcid=safe_text, password=safe_text)
def test_plain_round_trip(authcid: str, password: str) -> None:
    step = SaslExchange().start("PLAIN", plain("", authcid, password))
    assert step == Credentials("PLAIN", authcid, password)


@given(authcid=safe_text, password=safe_text)
def test_login_round_trip(authcid: str, password: str) -> None:
    ex = SaslExchange()
    ex.start("LOGIN")
    ex.respond(b64(authcid.encode()))
    assert ex.respond(b64(password.encode())) == Credentials("LOGIN", authcid, password)


@given(mechanism=st.sampled_from(["PLAIN", "LOGIN"]), lines=st.lists(st.binary(max_size=80)))
def test_arbitrary_lines_never_crash(mechanism: str, lines: list[bytes]) -> None:
    ex = SaslExchange()
    step = ex.start(mechanism)
    for line in lines:
        if not isinstance(step, Challenge):
            break
        step = ex.respond(line)
        assert isinstance(step, Challenge | Credentials | Failure)
    assert ex.finished == (not isinstance(step, Challenge))
