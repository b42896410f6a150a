"""What a milter verdict means for delivery: quarantine as Junk or hold, spam verdict headers
from the milters' own edits only."""

from __future__ import annotations

import logging

import pytest

from mailhaven.checks.milter.chain import MessageVerdict
from mailhaven.checks.milter.marks import delivery_marks, matches, spam_header
from mailhaven.checks.milter.settings import MilterSettings, spam_header_rules
from mailhaven.config import Milter
from mailhaven.intake.cleanup import MILTER_HOLD
from mailhaven.mailbox.folders import SPAM_FLAG
from mailhaven.proto import milter as m

RULES = spam_header_rules(
    ("X-Spam: Yes", "X-Spam-Flag: YES", "X-Spamd-Result: default: True*", "X-Virus: *")
)


def settings(
    quarantine: str = "junk", rules: tuple[tuple[str, str], ...] = RULES, listener: str = "smtp"
) -> MilterSettings:
    return MilterSettings(quarantine=quarantine, spam_headers=rules, daemon_name=listener)


@pytest.mark.parametrize(
    ("value", "pattern", "expected"),
    [
        ("Yes", "Yes", True),
        (" yes ", "YES", True),
        ("Yes, really", "Yes", False),
        ("No", "Yes", False),
        ("default: True [10.00 / 15.00];\r\n\tMH_TEST_SPAM(10.00)", "default: True*", True),
        ("default: False [1.00 / 15.00]", "default: True*", False),
        ("anything", "*", True),
    ],
)
def test_matches(value: str, pattern: str, expected: bool) -> None:
    assert matches(value, pattern) is expected


def test_the_default_rules_are_rspamd_and_spamassassin() -> None:
    rules = spam_header_rules(Milter().spam_headers)
    assert spam_header([m.AddHeader("X-Spam", "Yes")], rules) == "X-Spam: Yes"
    assert spam_header([m.InsertHeader(1, "X-Spam-Flag", " YES")], rules) == "X-Spam-Flag: YES"
    assert spam_header([m.AddHeader("X-Spam-Status", "No, score=1")], rules) is None


def test_a_deleted_field_is_no_verdict() -> None:
    assert spam_header([m.ChangeHeader(1, "X-Spam", "")], RULES) is None
    assert spam_header([m.ChangeHeader(1, "x-spam", "yes")], RULES) == "x-spam: yes"


def test_header_verdict_marks_spam(caplog: pytest.LogCaptureFixture) -> None:
    verdict = MessageVerdict(header_edits=[m.AddHeader("X-Spamd-Result", "default: True [9 / 15]")])
    with caplog.at_level(logging.INFO, "mailhaven.milter"):
        assert delivery_marks(verdict, settings(), "QID") == {SPAM_FLAG: "yes"}
    assert "QID: milter-junk: X-Spamd-Result: default: True [9 / 15]" in caplog.text


def test_no_verdict_no_marks() -> None:
    verdict = MessageVerdict(header_edits=[m.AddHeader("X-Spam", "No")])
    assert delivery_marks(verdict, settings(), "QID") == {}
    assert delivery_marks(MessageVerdict(), settings(), "QID") == {}


def test_quarantine_files_into_junk_by_default(caplog: pytest.LogCaptureFixture) -> None:
    verdict = MessageVerdict(quarantine="suspicious")
    with caplog.at_level(logging.INFO, "mailhaven.milter"):
        assert delivery_marks(verdict, settings(), "QID") == {SPAM_FLAG: "yes"}
    assert "QID: milter-junk: quarantine: suspicious" in caplog.text


def test_quarantine_hold_keeps_postfix_behaviour() -> None:
    verdict = MessageVerdict(quarantine="suspicious", header_edits=[m.AddHeader("X-Spam", "Yes")])
    assert delivery_marks(verdict, settings("hold"), "QID") == {
        MILTER_HOLD: "suspicious", SPAM_FLAG: "yes"
    }
    assert delivery_marks(MessageVerdict(quarantine="x"), settings("hold"), "Q") == {MILTER_HOLD: "x"}


def test_no_rules_no_header_verdicts() -> None:
    verdict = MessageVerdict(header_edits=[m.AddHeader("X-Spam", "Yes")])
    assert delivery_marks(verdict, settings(rules=()), "QID") == {}


@pytest.mark.parametrize("listener", ["submission", "submissions", "non_smtpd"])
def test_outbound_quarantine_always_holds(listener: str) -> None:
    """Our own users' mail a scanner quarantined must not be relayed out as if clean."""
    verdict = MessageVerdict(quarantine="outbound spam")
    assert delivery_marks(verdict, settings(listener=listener), "Q") == {MILTER_HOLD: "outbound spam"}
