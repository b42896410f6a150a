"""Milters: content scanners and signers (rspamd, SpamAssassin, ClamAV, OpenDKIM) plugged in
through the Sendmail/Postfix milter protocol.

`settings` (what `[checks.milter]` says), `client` (one connection to one milter: the asyncio
adapter around `proto.milter`), `pool` (connections kept between sessions), `chain` (all
milters of one SMTP session: a verdict per stage, the default action when one is down),
`rewrite` (an edited copy of a message), `marks` (quarantine and spam verdicts -> held, or
filed into Junk) and `non_smtpd` (the same for mail from `sendmail`/the pickup).
"""
