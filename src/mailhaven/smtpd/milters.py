"""The SMTP session's side of the milters: the macros they see and the log lines they cause.

In: the session's facts (client, HELO, TLS, AUTH, queue id) at each stage. Out: the macro
tables Postfix sends by default (`milter_*_macros`), and Postfix-shaped log lines
(`milter-reject`, `milter-discard`, `milter-hold`), so tools that read Postfix logs count them.
The protocol work is `checks.milter.chain`; this module only translates.
"""

from __future__ import annotations

import logging
import time
from typing import BinaryIO, Protocol

from mailhaven.intake.cleanup import received_header
from mailhaven.proto import smtp_server_events as ev
from mailhaven.proto.envelope import Envelope
from mailhaven.proto.milter_edit import HeaderField
from mailhaven.proto.replies import Reply
from mailhaven.smtpd.policy import SessionFacts

log = logging.getLogger("mailhaven.smtpd")

SOFTWARE = "mailhaven"


class EditableWriter(Protocol):
    """The spool writer as milters need it: read back, and a sibling for an edited copy."""

    @property
    def queue_id(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def spilled(self) -> bool: ...
    def write(self, data: bytes) -> None: ...
    def abort(self) -> None: ...
    def read_back(self) -> BinaryIO: ...
    def sibling(self) -> EditableWriter: ...


def connect_macros(facts: SessionFacts, hostname: str, daemon: str, daemon_addr: str) -> dict[str, str]:
    return {
        "j": hostname,
        "{daemon_name}": daemon,
        "{daemon_addr}": daemon_addr,
        "v": SOFTWARE,
        "_": f"{facts.client_name} [{facts.client_ip}]",
        "{client_addr}": facts.client_ip,
        "{client_name}": facts.client_name,
    }


def helo_macros(facts: SessionFacts) -> dict[str, str]:
    if facts.tls is None:
        return {}
    words = facts.tls.split()  # "using TLSv1.3 with cipher NAME (256/256 bits)"
    out = {"{tls_version}": words[1] if len(words) > 1 else ""}
    if len(words) > 4:
        out["{cipher}"] = words[4]
    return out


def mail_macros(facts: SessionFacts, queue_id: str, event: ev.MailFrom) -> dict[str, str]:
    out = {"i": queue_id, "{mail_addr}": event.address, "{mail_host}": event.address.rpartition("@")[2]}
    if facts.auth_user is not None:
        out["{auth_type}"] = "PLAIN"
        out["{auth_authen}"] = facts.auth_user
    return out


def mail_args(event: ev.MailFrom) -> list[str]:
    params = event.params
    args = []
    if params.size is not None:
        args.append(f"SIZE={params.size}")
    if params.body and params.body != "7BIT":
        args.append(f"BODY={params.body}")
    if params.smtputf8:
        args.append("SMTPUTF8")
    return args


def rcpt_macros(event: ev.RcptTo) -> dict[str, str]:
    return {"{rcpt_addr}": event.address, "{rcpt_host}": event.address.rpartition("@")[2]}


def log_action(
    queue_id: str | None,
    what: str,
    stage: str,
    label: str,
    detail: str,
    *,
    sender: str,
    rcpt: str | None,
    extended: bool,
    helo: str,
) -> None:
    """`QID: milter-reject: END-OF-MESSAGE from name[ip]: 5.7.1 text; from=<> to=<> ...`"""
    to = f" to=<{rcpt}>" if rcpt is not None else ""
    log.info(
        "%s: milter-%s: %s from %s: %s; from=<%s>%s proto=%s helo=<%s>",
        queue_id or "NOQUEUE",
        what,
        stage,
        label,
        detail,
        sender,
        to,
        "ESMTP" if extended else "SMTP",
        helo,
    )


def detail(reply: Reply) -> str:
    """Postfix logs a milter's refusal without its code: `5.7.1 Gtube pattern`."""
    return f"{reply.dsn} {reply.text}" if reply.enhanced else reply.text


def trace_field(envelope: Envelope, queue_id: str, hostname: str, tls: str | None) -> HeaderField:
    """Our Received: field as intake will store it, for milters to see first."""
    raw = received_header(envelope, queue_id=queue_id, hostname=hostname, now=time.time(), tls=tls)
    value = raw.decode("utf-8", "replace").partition(":")[2].rstrip("\r\n").replace("\r\n", "\n")
    return HeaderField("Received", value, raw)
