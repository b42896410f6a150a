"""The receive role: SMTP on the MX and submission ports.

`server` owns the listening sockets and the connection admission; `session` drives the sans-I/O
core `proto.smtp_server` for one connection and asks `policy`/`auth` and the checks what is
welcome; `inbound_gate`, `milters` and `milter_stages` run the message checks at the end of
DATA; accepted messages go to intake. `lmtp_store` is the LMTP listener's store (the same core in
LMTP mode, one reply per recipient). May import every layer below it (pyproject.toml): checks,
the scheduler's direct door, delivery (the local agent, for LMTP), intake, routing, config,
spool, mailbox, net and proto; never pop3d, control or app.
"""
