"""SMTP replies as values (RFC 5321 §4.2, enhanced status codes RFC 3463).

A `Reply` is what every role hands back: the server core sends them, delivery agents return one
per recipient, the scheduler records them. Expected outcomes are values, not exceptions.

Serialisation follows RFC 5321 §4.2.1: every line but the last carries `code-text`, the last
`code text`. When ENHANCEDSTATUSCODES is in force (RFC 2034) the enhanced code is repeated at the
start of every line's text.

Where a reply came from: `answered` is set only on replies a peer sent us (by the SMTP client
core, `proto.smtp_client`) and names what they answered: "greeting" or the command ("EHLO",
"MAIL FROM", "RCPT TO", "DATA", "end of DATA", ...). Replies we make up ourselves (connection
refused, DNS failure, "delivered to maildir") leave it None. Logs use it to tell "host H said:
550 ..." from our own words, as Postfix's smtp(8) does; it takes no part in equality.

One constructor, one argument order everywhere: `Reply(code, text, enhanced, more)` (the
optional parts last). The texts mailhaven's own protocol cores send live in the catalogue at the
end of this module, so a reply can be found by its words.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets including CRLF.
MAX_REPLY_LINE = 512


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: a three-digit code, an optional enhanced code and one or more lines."""

    code: int
    text: str = ""
    enhanced: str | None = None
    more: tuple[str, ...] = ()
    #: What a peer's reply answered ("greeting", "RCPT TO", ...); None when we made it up.
    answered: str | None = field(default=None, compare=False)

    @property
    def lines(self) -> tuple[str, ...]:
        return (self.text, *self.more)

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 300

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    @property
    def dsn(self) -> str:
        """The RFC 3463 status for logs (`dsn=X.Y.Z`), derived from the code when absent."""
        if self.enhanced:
            return self.enhanced
        return f"{self.code // 100}.0.0"

    def to_bytes(self, enhanced_codes: bool = True) -> bytes:
        """Serialise with `-` continuation lines and CRLF endings."""
        prefix = f"{self.enhanced} " if (enhanced_codes and self.enhanced) else ""
        if not self.more:  # the common case, without the loop below
            text = f"{prefix}{self.text}" if self.text or prefix else ""
            return (f"{self.code} {text}".rstrip(" ") + "\r\n").encode("utf-8", "replace")
        lines = self.lines
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            text = f"{prefix}{line}" if line or prefix else ""
            out.append(f"{self.code}{sep}{text}".rstrip(" ") + "\r\n")
        return "".join(out).encode("utf-8", "replace")

    def one_line(self) -> str:
        """A single-line rendering for logs: `550 5.1.1 text`."""
        parts = [str(self.code)]
        if self.enhanced:
            parts.append(self.enhanced)
        parts.append(" ".join(x for x in self.lines if x))
        return " ".join(p for p in parts if p)


# --------------------------------------------------------------------------------- catalogue
# What mailhaven's SMTP/LMTP server says, in Postfix's words where Postfix has words for it, so
# clients and log readers see familiar text: first the server core (`proto.smtp_server`), then the
# listener around it (`smtpd`, the checks and stores it asks). Parametrised ones are functions.
# Not here: texts that carry someone else's words (a remote server's reply, a milter's
# SMFIR_REPLYCODE, a DNS list's or a policy's configured text) and POP3's (`proto.pop3`).

OK = Reply(250, "Ok", "2.0.0")
SENDER_OK = Reply(250, "Ok", "2.1.0")
RECIPIENT_OK = Reply(250, "Ok", "2.1.5")
BYE = Reply(221, "Bye", "2.0.0")
START_DATA = Reply(354, "End data with <CR><LF>.<CR><LF>")
START_TLS = Reply(220, "Ready to start TLS", "2.0.0")

# line-level refusals (before the command is looked at)
SYNC_ERROR = Reply(554, "Error: SMTP protocol synchronization", "5.5.0")
LINE_TOO_LONG = Reply(500, "Error: line too long", "5.5.2")
AUTH_LINE_TOO_LONG = Reply(500, "Error: authentication line too long", "5.5.6")
NUL_IN_COMMAND = Reply(500, "Error: NUL character in command", "5.5.2")
BARE_CR_IN_COMMAND = Reply(500, "Error: bare <CR> in command", "5.5.2")
BAD_UTF8_IN_COMMAND = Reply(500, "Error: invalid UTF-8 in command", "5.5.2")
EIGHT_BIT_IN_COMMAND = Reply(500, "Error: 8-bit characters in command", "5.5.2")
UNRECOGNIZED = Reply(500, "Error: command not recognized", "5.5.2")
NOT_IMPLEMENTED = Reply(502, "Error: command not implemented", "5.5.1")
#: HELO/EHLO on an LMTP listener (RFC 2033 §4.1: LHLO replaces them).
LMTP_NEEDS_LHLO = Reply(500, "Error: this is LMTP, send LHLO", "5.5.1")

# command sequence (RFC 5321 §4.1.4): the transition table's refusals
NEED_HELO = Reply(503, "Error: send HELO/EHLO first", "5.5.1")
NEED_LHLO = Reply(503, "Error: send LHLO first", "5.5.1")
NEED_EHLO = Reply(503, "Error: send EHLO first", "5.5.1")
NEED_MAIL = Reply(503, "Error: need MAIL command", "5.5.1")
NEED_RCPT = Reply(503, "Error: need RCPT command", "5.5.1")
NESTED_MAIL = Reply(503, "Error: nested MAIL command", "5.5.1")
IN_TRANSACTION = Reply(503, "Error: MAIL transaction in progress", "5.5.1")
BDAT_IN_PROGRESS = Reply(503, "Error: BDAT transfer in progress", "5.5.1")
CHUNKING_NOT_OFFERED = Reply(503, "Error: CHUNKING not offered, send EHLO first", "5.5.1")
ALREADY_AUTHENTICATED = Reply(503, "Error: already authenticated", "5.5.1")
TLS_ACTIVE = Reply(554, "Error: TLS already active", "5.5.1")
AUTH_NOT_ENABLED = Reply(502, "Error: authentication not enabled", "5.5.1")
AUTH_NEEDS_TLS = Reply(538, "Error: encryption required for requested authentication", "5.7.11")
AUTH_UNKNOWN_MECHANISM = Reply(504, "Error: unsupported authentication mechanism", "5.5.4")

# arguments
NEEDS_SMTPUTF8 = Reply(553, "Error: must declare SMTPUTF8 to send non-ASCII addresses", "5.6.7")
SIZE_EXCEEDED = Reply(552, "Error: message size exceeds fixed maximum message size", "5.3.4")
TOO_MANY_RECIPIENTS = Reply(452, "Error: too many recipients", "4.5.3")
ETRN_SYNTAX = Reply(500, "Syntax: ETRN domain", "5.5.2")

# message content
MESSAGE_TOO_BIG = Reply(552, "Error: message file too big", "5.3.4")
BARE_NEWLINE = Reply(554, "Error: bare <CR> or <LF> in message data (RFC 5321 2.3.8)", "5.5.2")


def syntax(usage: str) -> Reply:
    """501 for a command whose arguments do not parse: `usage` shows the right form."""
    return Reply(501, f"Syntax: {usage}", "5.5.4")


# MAIL/RCPT arguments (`proto.address`): 501 syntax, 553 mailbox syntax, 555 parameters
BAD_ADDRESS_SYNTAX = Reply(553, "Error: bad address syntax", "5.1.3")
LOCAL_PART_TOO_LONG = Reply(501, "Error: local part too long (RFC 5321 4.5.3.1.1)", "5.1.3")
DOMAIN_TOO_LONG = Reply(501, "Error: domain too long (RFC 5321 4.5.3.1.2)", "5.1.3")
PATH_TOO_LONG = Reply(501, "Error: path too long (RFC 5321 4.5.3.1.3)", "5.1.3")
MISSING_CLOSING_BRACKET = Reply(501, "Error: missing '>' in address", "5.1.7")
PATH_SYNTAX = syntax("MAIL FROM:<address> or RCPT TO:<address>")
NULL_ADDRESS_NOT_ALLOWED = Reply(501, "Error: null address not allowed here", "5.1.3")
BAD_SOURCE_ROUTE = Reply(553, "Error: bad source route syntax", "5.1.3")
BAD_XTEXT = Reply(501, "Error: bad xtext encoding", "5.5.4")
BAD_SIZE = Reply(501, "Error: bad SIZE parameter", "5.5.4")
BAD_BODY = Reply(501, "Error: BODY must be 7BIT or 8BITMIME", "5.5.4")
SMTPUTF8_TAKES_NO_VALUE = Reply(501, "Error: SMTPUTF8 takes no value", "5.5.4")
BAD_RET = Reply(501, "Error: RET must be FULL or HDRS", "5.5.4")
BAD_ENVID = Reply(501, "Error: bad ENVID parameter", "5.5.4")
BAD_NOTIFY = Reply(501, "Error: bad NOTIFY parameter", "5.5.4")
BAD_ORCPT = Reply(501, "Error: bad ORCPT parameter", "5.5.4")


def bad_parameter_syntax(item: str) -> Reply:
    return Reply(555, f"Error: bad parameter syntax: {item[:40]}", "5.5.4")


def duplicate_parameter(keyword: str) -> Reply:
    return Reply(501, f"Error: duplicate {keyword} parameter", "5.5.4")


def unsupported_parameter(verb: str, keyword: str) -> Reply:
    """`verb`: MAIL or RCPT."""
    return Reply(555, f"Error: unsupported {verb} parameter {keyword[:40]}", "5.5.4")


def greeting(hostname: str, banner: str) -> Reply:
    return Reply(220, f"{hostname} {banner}")


def hello(first: str, keywords: tuple[str, ...] = ()) -> Reply:
    """HELO/EHLO/LHLO accepted: our name (or the application's line), then the EHLO keywords."""
    return Reply(250, first, None, keywords)


def too_many_errors(hostname: str) -> Reply:
    return Reply(421, f"{hostname} Error: too many errors", "4.7.0")


def too_many_commands(hostname: str) -> Reply:
    return Reply(421, f"{hostname} Error: too many commands", "4.7.0")


def chunk_received(octets: int) -> Reply:
    return Reply(250, f"Ok: {octets} octets received", "2.0.0")


def help_unknown(argument: str) -> Reply:
    return Reply(504, f"Error: unknown command {argument[:30]!r}", "5.5.1")


def help_commands(names: str) -> Reply:
    """HELP without an argument: the commands that work on this listener."""
    return Reply(214, "Commands:", "2.0.0", (names, "HELP <command> explains one command"))


def help_text(text: str) -> Reply:
    return Reply(214, text, "2.0.0")


# ------------------------------------------------------------------ authentication (RFC 4954)
# The SASL exchange's failures (`proto.sasl.smtp_reply`) and the adapter's verdicts
# (`smtpd.auth`, `smtpd.session`). POP3 words its own (`proto.pop3`).

AUTH_OK = Reply(235, "Authentication successful", "2.7.0")
AUTH_FAILED = Reply(535, "Error: authentication failed", "5.7.8")
AUTH_BLOCKED = Reply(454, "Error: too many failed logins, try again later", "4.7.0")
#: no authenticator, or it broke: the client may try again (RFC 4954 §6)
AUTH_TEMPORARY_FAILURE = Reply(454, "Temporary authentication failure", "4.7.0")
AUTH_REQUIRED = Reply(530, "Error: authentication required", "5.7.0")
AUTH_BAD_BASE64 = Reply(501, "Cannot decode response", "5.5.2")
AUTH_ABORTED = Reply(501, "Authentication aborted", "5.0.0")
AUTH_CREDENTIALS_INVALID = Reply(535, "Authentication credentials invalid", "5.7.8")
AUTHZID_NOT_PERMITTED = Reply(535, "Authorization identity not permitted", "5.7.8")


# ------------------------------------------------------------------ the SMTP/LMTP listener
# What the adapter (`smtpd`) and the checks it asks answer. The session's own 421s name the
# host, as RFC 5321 §3.8 and Postfix do.


def shutting_down(hostname: str) -> Reply:
    return Reply(421, f"{hostname} Service shutting down", "4.3.2")


def timeout_exceeded(hostname: str) -> Reply:
    return Reply(421, f"{hostname} Error: timeout exceeded", "4.4.2")


def too_many_connections(hostname: str) -> Reply:
    """`limits.connections` sessions are open already."""
    return Reply(421, f"{hostname} Error: too many connections, try again later", "4.7.0")


def too_many_connections_from(hostname: str, ip: str) -> Reply:
    return Reply(421, f"{hostname} Error: too many connections from {ip}", "4.7.0")


def connection_rate_exceeded(hostname: str, ip: str) -> Reply:
    return Reply(421, f"{hostname} Error: too many connections from {ip}, slow down", "4.7.0")


def too_much_mail_from(ip: str) -> Reply:
    return Reply(450, f"Error: too much mail from {ip}", "4.7.1")


#: a bug or a failing store: the transaction is refused, the session goes on
INTERNAL_ERROR = Reply(451, "Error: internal error, try again later", "4.3.0")
#: the same, where the session cannot go on
INTERNAL_ERROR_CLOSING = Reply(421, INTERNAL_ERROR.text, "4.3.0")
#: the queue's disk is (nearly) full: RFC 3463 4.3.1 "mail system full"; Postfix's wording
STORAGE_FULL = Reply(452, "Insufficient system storage", "4.3.1")
#: more Received: fields than the hop limit (RFC 5321 §6.3)
TOO_MANY_HOPS = Reply(554, "Too many hops: mail forwarding loop", "5.4.6")


def queued_as(queue_id: str) -> Reply:
    return Reply(250, f"Ok: queued as {queue_id}", "2.0.0")


def discarded_as(queue_id: str) -> Reply:
    """A milter said DISCARD to a local submission (sendmail, pickup): the submitter is told.
    (An SMTP client is told `queued_as`, as Postfix's smtpd does.)"""
    return Reply(250, f"Ok: discarded as {queue_id}", "2.0.0")


def sender_not_owned(address: str, user: str) -> Reply:
    return Reply(553, f"<{address}>: Sender address rejected: not owned by user {user}", "5.7.1")


def vrfy_address(address: str) -> Reply:
    return Reply(250, f"<{address}>", "2.1.5")


CANNOT_VRFY = Reply(252, "Cannot VRFY user, but will accept message and attempt delivery", "2.5.2")
EXPN_DISABLED = Reply(502, "Error: EXPN is disabled", "5.5.1")
NO_SUCH_LIST = Reply(550, "Error: no such list", "5.1.1")


def expansion(addresses: tuple[str, ...]) -> Reply:
    """EXPN's answer: one `<address>` per line (the caller never passes an empty list)."""
    lines = tuple(f"<{a}>" for a in addresses)
    return Reply(250, lines[0], "2.1.5", lines[1:])


# ETRN (RFC 1985 §5)


def etrn_unable(argument: str) -> Reply:
    """458: nothing can be released for `argument` (a `#queue` or a node)."""
    what = "queue" if argument.startswith("#") else "node"
    return Reply(458, f"Unable to queue messages for {what} {argument}", "4.3.0")


def etrn_not_allowed(argument: str, client_ip: str) -> Reply:
    return Reply(459, f"<{argument}>: ETRN not allowed from {client_ip}", "4.7.1")


def etrn_unknown_node(argument: str) -> Reply:
    return Reply(459, f"<{argument}>: Node not allowed: not a part-time host here", "4.7.1")


def etrn_nothing_waiting(argument: str) -> Reply:
    return Reply(251, f"OK, no messages waiting for node {argument}", "2.0.0")


def etrn_started(count: int, argument: str) -> Reply:
    return Reply(253, f"OK, {count} pending messages for node {argument} started", "2.0.0")


# LMTP (RFC 2033): the local store's per-recipient answers
DELIVERED = Reply(250, "delivered to maildir", "2.0.0")


def not_a_mailbox(address: str) -> Reply:
    text = f"<{printable(address)}>: Recipient address rejected: not a mailbox here"
    return Reply(550, text, "5.1.1")


# milters: the default action's answers (Postfix's milter_default_action)
MILTER_REJECTED = Reply(550, "Command rejected", "5.7.1")
MILTER_TEMPFAILED = Reply(451, "Service unavailable - try again later", "4.7.1")
#: SMFIR_CONN_FAIL: the session ends
MILTER_CONN_FAILED = Reply(421, "Service unavailable - try again later", "4.7.0")


# ------------------------------------------------------------------ restrictions
# Refusals of the checks a session asks (routing, `checks`), in Postfix's smtpd restriction
# shape `<what>: X rejected: reason`. An address or name from the client is shown with its
# control characters replaced, so nothing but printable text reaches the wire.


def printable(text: str) -> str:
    """`text` with every non-printable character replaced by "?" (for a reply line)."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


#: RCPT TO whose address does not parse (RFC 5321 §4.1.2)
BAD_RECIPIENT_SYNTAX = Reply(501, "Bad recipient address syntax", "5.1.3")


def user_unknown(address: str) -> Reply:
    text = f"<{printable(address)}>: Recipient address rejected: User unknown in local recipient table"
    return Reply(550, text, "5.1.1")


def relay_denied(address: str) -> Reply:
    return Reply(554, f"<{printable(address)}>: Relay access denied", "5.7.1")


def recipient_mailbox_full(address: str) -> Reply:
    return Reply(452, f"<{printable(address)}>: Recipient address rejected: mailbox full", "4.2.2")


def unknown_client_hostname(client_ip: str) -> Reply:
    """reject_unknown_client_hostname (RFC 7372: 4.7.25, reverse DNS failed)."""
    return Reply(450, f"Client host rejected: cannot find your hostname, [{client_ip}]", "4.7.25")


def helo_claims_to_be_us(helo: str) -> Reply:
    return Reply(554, f"<{printable(helo)}>: Helo command rejected: host claims to be us", "5.7.1")


def helo_not_fqdn(helo: str) -> Reply:
    text = f"<{printable(helo)}>: Helo command rejected: need fully-qualified hostname"
    return Reply(504, text, "5.5.2")


def recipient_access_denied(recipient: str) -> Reply:
    text = f"<{printable(recipient)}>: Recipient address rejected: Access denied"
    return Reply(550, text, "5.7.1")


def sender_access_denied(sender: str) -> Reply:
    return Reply(554, f"<{printable(sender)}>: Sender address rejected: Access denied", "5.7.1")


def client_access_denied(client_label: str) -> Reply:
    """`client_label`: Postfix's `name[ip]` of the client."""
    return Reply(554, f"<{client_label}>: Client host rejected: Access denied", "5.7.1")


def client_blocklisted(client_ip: str, lists: str) -> Reply:
    """The client's address is on DNS lists (`lists` names them)."""
    text = f"Service unavailable; client [{client_ip}] blocked using {lists}"
    return Reply(554, text, "5.7.1")


def sender_domain_blocklisted(domain: str, lists: str) -> Reply:
    text = f"Service unavailable; sender domain {printable(domain)} blocked using {lists}"
    return Reply(554, text, "5.7.1")


def greylisted(recipient: str, seconds: int) -> Reply:
    text = (
        f"<{printable(recipient)}>: Recipient address rejected: Greylisted, try again "
        f"in {seconds} seconds"
    )
    return Reply(450, text, "4.7.1")


def sender_rate_limited(sender: str, user: str, figures: str) -> Reply:
    """An authenticated user past `[checks.sender_limits]`; `figures` says by how much."""
    text = (
        f"<{printable(sender)}>: Sender address rejected: Sender rate limit exceeded "
        f"for {user}: {figures}, try again later"
    )
    return Reply(450, text, "4.7.1")


# SPF and DMARC (RFC 7208 §8, RFC 7489 §6.6, RFC 7372's enhanced codes); the domains and the
# SPF explanation come from the sender's DNS: the caller passes them already made printable
DMARC_TEMPERROR = Reply(451, "Temporary DNS failure checking DMARC, try again later", "4.7.5")
SPF_TEMPERROR = Reply(451, "Temporary DNS failure checking SPF, try again later", "4.7.24")


def dmarc_rejected(from_domain: str, policy: str) -> Reply:
    text = (
        f"Message rejected: {from_domain} publishes DMARC p={policy}, and this message is "
        "not authenticated as coming from it"
    )
    return Reply(550, text, "5.7.1")


def spf_failed(domain: str, explanation: str = "") -> Reply:
    text = f"SPF: {domain} does not allow this client to send its mail"
    return Reply(550, f"{text}: {explanation}" if explanation else text, "5.7.23")
