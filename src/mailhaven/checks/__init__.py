"""What a session asks before it says yes: limits and checks on clients, senders and messages.

Each module is one family of checks: connection and message rates, authentication failures,
DNS lists, greylisting, milters (`checks/milter/`), SPF/DKIM/DMARC/ARC. Checks are policy: they
return verdicts or `Reply` values and never write to the client themselves. In: client and
message facts. Out: verdicts. May import what lies below it in the layers (pyproject.toml):
intake and pickup (milters also see locally submitted mail), routing, config, mailbox (is the mailbox
full), net (DNS) and proto; never smtpd or pop3d, which ask it.

The abuse defences (docs/filtering.md): `gate` is the facade a session asks at connect, MAIL
FROM and RCPT TO, and `services` builds it from the configuration; behind it `access_lists`,
`client_checks`, `dnsbl` (scores) with `dnsbl_lookup` (parallel, cached, bounded lookups),
`greylist` (RFC 6647 decisions) with `greylist_store` (SQLite), and `sender_limits`.

Mail authentication: `spf`, `dkim_verify`, `dmarc`, `arc_verify` each answer one question with a
value, `authresults` writes the RFC 8601 header, and `inbound` runs them for one message from an
untrusted client and turns the results into accept / quarantine / 451 / 550.
"""
