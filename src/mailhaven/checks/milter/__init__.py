"""Milters: content scanners and signers (rspamd, SpamAssassin, ClamAV, OpenDKIM) plugged in
through the Sendmail/Postfix milter protocol.

`settings` (what the configuration says), `client` (one connection to one milter: the asyncio
adapter around `proto.milter`), `chain` (all milters of one SMTP session: a verdict per stage,
the default action when one is down) and `rewrite` (an edited copy of a message).
"""
