"""The mailbox access role: POP3 (RFC 1939) on the users' Maildirs.

`server` accepts connections, `session` drives the sans-I/O core `proto.pop3` over `maildrop`,
the POP3 view of one Maildir (RFC 1939's "maildrop": a snapshot, deletions applied at QUIT);
`login_delay` keeps each user's last login for LOGIN-DELAY over every listener.
May import mailbox, checks, net and proto.
"""
