"""HELP texts (RFC 5321 §4.1.1.8): one line per command, for people typing at the server."""

from __future__ import annotations

HELP_TEXT: dict[str, str] = {
    "HELO": "HELO <hostname> - identify yourself (plain SMTP)",
    "EHLO": "EHLO <hostname> - identify yourself and list the ESMTP extensions",
    "LHLO": "LHLO <hostname> - identify yourself and list the extensions (LMTP)",
    "MAIL": "MAIL FROM:<sender> [SIZE=n] [BODY=8BITMIME] [SMTPUTF8] [RET=] [ENVID=] - start a message",
    "RCPT": "RCPT TO:<recipient> [NOTIFY=] [ORCPT=] - add a recipient (repeat for more)",
    "DATA": "DATA - send the message, end it with a line holding only a dot",
    "BDAT": "BDAT <size> [LAST] - send the next <size> octets of the message (CHUNKING)",
    "RSET": "RSET - abandon the current message",
    "NOOP": "NOOP - do nothing, answer 250",
    "QUIT": "QUIT - close the connection",
    "VRFY": "VRFY <address> - ask whether an address exists (answers 252 by default)",
    "EXPN": "EXPN <list> - expand a mailing list (disabled by default)",
    "HELP": "HELP [command] - this text",
    "STARTTLS": "STARTTLS - switch the connection to TLS",
    "AUTH": "AUTH <mechanism> [initial-response] - log in (after STARTTLS)",
    "ETRN": "ETRN <domain> | @<domain> - ask for queued mail of a part-time host (RFC 1985)",
}

#: RFC 821 commands dropped by RFC 5321: recognised and refused with 502.
OBSOLETE = frozenset({"SEND", "SOML", "SAML", "TURN"})

ORDER = tuple(HELP_TEXT)
