"""End to end: SpamAssassin (spamd -L, offline) through spamass-milter, Debian's packages.

GTUBE is refused at end of data with spamass-milter's `550 5.7.1 Blocked by SpamAssassin`; a
clean message is delivered with SpamAssassin's X-Spam-* headers. ClamAV (clamav-milter):
tests/e2e/test_clamav_milter.py.
"""

from __future__ import annotations

import smtplib
import uuid
from collections.abc import Iterator

import pytest
from tests.support import spamassassin
from tests.support.server import MailServer

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def scanner() -> Iterator[spamassassin.SpamAssassinMilter]:
    reason = spamassassin.skip_reason()
    if reason:
        pytest.skip(reason)
    with spamassassin.SpamAssassinMilter() as running:
        yield running


def message(body: str) -> str:
    return (
        "From: bob@example.com\r\nTo: alice@example.org\r\nSubject: hi\r\n"
        f"Date: Fri, 04 Dec 2026 12:00:00 +0000\r\nMessage-ID: <{uuid.uuid4()}@example.com>\r\n"
        f"\r\n{body}\r\n"
    )


def test_gtube_is_refused(milter_mx: MailServer) -> None:
    with smtplib.SMTP(milter_mx.host, milter_mx.smtp_port, timeout=60) as client, pytest.raises(
        smtplib.SMTPDataError
    ) as err:
        client.sendmail("bob@example.com", ["alice@example.org"], message(spamassassin.GTUBE))
    assert (err.value.smtp_code, err.value.smtp_error) == (550, b"5.7.1 Blocked by SpamAssassin")
    milter_mx.wait_for_log(r"milter-reject: END-OF-MESSAGE from \S+: 5\.7\.1 Blocked by SpamAssassin")


def test_clean_message_gets_spamassassin_headers(milter_mx: MailServer) -> None:
    mark = uuid.uuid4().hex
    with smtplib.SMTP(milter_mx.host, milter_mx.smtp_port, timeout=60) as client:
        client.sendmail("bob@example.com", ["alice@example.org"], message(mark))
    data = milter_mx.wait_for_mark("alice", mark, timeout=30)
    assert b"X-Spam-Status: No, score=" in data
    assert b"X-Spam-Checker-Version: SpamAssassin" in data
