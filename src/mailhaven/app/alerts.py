"""Notices to the postmaster from the checks (a user hit the sender limits, `checks.gate`).

In: a subject and a plain-text body, from a synchronous caller inside a session. Out: one small
message from `MAILER-DAEMON@<hostname>` to `postmaster@<first local domain>`, queued through
intake like any local mail (null sender: a failure is never bounced), in a task of its own so
the session that triggered it does not wait; the result is logged, a failure with its
traceback. The task is started by `spawn` (the process's TaskGroup), so it ends with the
process. Intake adds Date: and Message-ID: (protocol "local").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from mailhaven.config import Config
from mailhaven.proto.envelope import Envelope, RecipientSpec
from mailhaven.smtpd.profile import MessageSink

log = logging.getLogger("mailhaven.checks")


def notice(config: Config, subject: str, text: str) -> tuple[Envelope, bytes]:
    """The envelope and bytes of one notice to the postmaster."""
    to = f"postmaster@{config.local_domains[0]}"
    head = (
        f"From: Mail Delivery System <MAILER-DAEMON@{config.hostname}>\r\n"
        f"To: <{to}>\r\nSubject: {subject}\r\nAuto-Submitted: auto-generated\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    data = (head + text.replace("\r\n", "\n").replace("\n", "\r\n")).encode("utf-8")
    envelope = Envelope(sender="", recipients=(RecipientSpec(to),), protocol="local",
                        body_type="7BIT" if data.isascii() else "8BITMIME")
    return envelope, data


class PostmasterAlerts:
    """`alert(subject, text)` for `checks.services.CheckServices`; the sink comes late (it is
    built with the engine)."""

    def __init__(
        self,
        config: Callable[[], Config],
        sink: Callable[[], MessageSink | None],
        spawn: Callable[[Coroutine[Any, Any, None]], object],
    ) -> None:
        self._config = config
        self._sink = sink
        self._spawn = spawn

    def __call__(self, subject: str, text: str) -> None:
        self._spawn(self._send(subject, text))

    async def _send(self, subject: str, text: str) -> None:
        sink = self._sink()
        envelope, data = notice(self._config(), subject, text)
        to = envelope.recipients[0].address
        if sink is None:
            log.warning("notice to %s not sent (no queue yet): %s", to, subject)
            return
        try:
            writer = sink.new_message()
            writer.write(data)
            reply = await sink.accept(writer, envelope, None)
        except Exception:  # a notice is not worth stopping the mail server for
            log.exception("cannot queue the notice to %s: %s", to, subject)
            return
        if reply.is_success:
            log.info("%s: notice to %s: %s", writer.queue_id, to, subject)
        else:
            log.warning("notice to %s not queued: %s", to, reply.one_line())
