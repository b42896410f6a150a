"""The receive role: SMTP on the MX and submission ports.

`server` owns the listening sockets and the connection admission; `session` drives the sans-I/O
core `proto.smtp_server` for one connection and asks `policy`/`auth` and the checks what is
welcome; accepted messages go to intake. May import checks, intake, routing, net and proto.
"""
