"""The intake role: the only door into the queue (Postfix's cleanup).

`cleanup` takes a received message (from smtpd, pickup or bounce), expands its recipients,
adds our trace header and commits it durably to the spool before anyone says "queued"; then it
hands the message to the scheduler. In: a body writer, an `Envelope`, session facts. Out: a
queue id or a refusal `Reply`. May import spool, routing (as injected callables) and proto.
"""
