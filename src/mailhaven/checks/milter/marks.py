"""What the milters' verdict means for delivery: the message is held, or marked as spam.

In: the combined `MessageVerdict` of a message's milters and their `MilterSettings`. Out: the
`Envelope.extra` entries to add (`intake.cleanup.MILTER_HOLD`: kept on hold in the queue;
`mailbox.folders.SPAM_FLAG`: local copies are filed into the recipient's junk folder) and a
line for the log.

Two verdicts mark spam:
- SMFIR_QUARANTINE: with `quarantine = "junk"` (the default: on a mailbox host users look for
  suspicious mail in their Junk folder, not in a queue only the administrator sees) mail that
  arrived on the MX listener is marked as spam; with "hold", and always for mail our own users
  send (submission, `sendmail`), it is held, as Postfix does: outbound mail a scanner
  quarantined must not leave for other hosts, where no Junk folder of ours is.
- A scanner's verdict header that a milter added or set (`spam_headers`, e.g. rspamd's
  `X-Spam: Yes` from its "add header" action, SpamAssassin's `X-Spam-Flag: YES`).

SECURITY: only the milters' header edits are read, never the header the client sent, so a
sender cannot file its own mail anywhere by writing `X-Spam: Yes` (or keep it out of Junk with
`X-Spam: No`): the milters are the administrator's, the header is the sender's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from mailhaven.checks.milter.chain import MessageVerdict
from mailhaven.checks.milter.settings import MilterSettings
from mailhaven.intake.cleanup import MILTER_HOLD
from mailhaven.mailbox.folders import SPAM_FLAG
from mailhaven.proto.milter_edit import HeaderEdit

log = logging.getLogger("mailhaven.milter")

#: The entries whose mail comes from other hosts (`MilterSettings.daemon_name`): only there
#: does a quarantine mean "the recipient's Junk folder".
INBOUND = frozenset({"smtp"})


def matches(value: str, pattern: str) -> bool:
    """`pattern` against a header value, ignoring case and folding: "*" is anything, a
    trailing "*" a prefix, else the whole (trimmed) value."""
    text = " ".join(value.split()).lower()
    want = " ".join(pattern.split()).lower()
    if want == "*":
        return True
    if want.endswith("*"):
        return text.startswith(want[:-1].rstrip())
    return text == want


def spam_header(edits: Iterable[HeaderEdit], rules: Iterable[tuple[str, str]]) -> str | None:
    """The first header field a milter added or set that marks spam, as "Name: value"."""
    rules = tuple(rules)
    for edit in edits:
        if not edit.value:  # ChangeHeader with an empty value deletes a field
            continue
        name = edit.name.strip().lower()
        for rule_name, pattern in rules:
            if name == rule_name and matches(edit.value, pattern):
                return f"{edit.name.strip()}: {' '.join(edit.value.split())[:80]}"
    return None


def delivery_marks(verdict: MessageVerdict, settings: MilterSettings, queue_id: str) -> dict[str, str]:
    """The envelope `extra` entries the verdict asks for (empty: deliver as usual); logs why."""
    marks: dict[str, str] = {}
    if verdict.quarantine is not None:
        if settings.quarantine == "hold" or settings.daemon_name not in INBOUND:
            marks[MILTER_HOLD] = verdict.quarantine  # intake logs the milter-hold line
        else:
            marks[SPAM_FLAG] = "yes"
            log.info("%s: milter-junk: quarantine: %s", queue_id, verdict.quarantine)
    if SPAM_FLAG not in marks:
        found = spam_header(verdict.header_edits, settings.spam_headers)
        if found is not None:
            marks[SPAM_FLAG] = "yes"
            log.info("%s: milter-junk: %s", queue_id, found)
    return marks
