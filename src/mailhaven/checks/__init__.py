"""What a session asks before it says yes: limits and checks on clients, senders and messages.

Each module is one family of checks (connection and message rates, authentication failures, and
as they land: DNS lists, greylisting, milters, SPF/DKIM/DMARC/ARC). Checks are policy: they
return verdicts or `Reply` values and never write to the client themselves. In: client and
message facts. Out: verdicts. May import net (DNS), spool and proto; never smtpd or pop3d.

The abuse defences (docs/filtering.md): `gate` is the facade a session asks at connect, MAIL
FROM and RCPT TO, and `services` builds it from the configuration; behind it `access_lists`,
`client_checks`, `dnsbl` (scores) with `dnsbl_lookup` (parallel, cached, bounded lookups),
`greylist` (RFC 6647 decisions) with `greylist_store` (SQLite), and `sender_limits`.

Mail authentication: `spf`, `dkim_verify`, `dmarc`, `arc_verify` each answer one question with a
value, `authresults` writes the RFC 8601 header, and `inbound` runs them for one message from an
untrusted client and turns the results into accept / quarantine / 451 / 550.
"""
