"""Mailboxes: the Maildir store that deliveries write and POP3 reads, and the users database.

In: messages to store, names and passwords to check. Out: files, verdicts. May import proto
vocabulary only; no protocol logic (the POP3 view of a Maildir lives in `pop3d`).
"""
