"""Networking we own, below every role: the one asyncio byte `stream` (owned buffer, timeouts,
backpressure, STARTTLS) and how to open one, TLS contexts (`tls`, `tls_tickets`) and
certificates (`selfsigned`, `acme`, `acme_alpn`), DNS (`dns`, `dns_cache`, `dnslist`), client
names (`client_names`), and address parsing (`hostport`, `ipaddr`).

In: sockets, names, certificates. Out: streams, answers, contexts. May import runtime and
proto (the layers in pyproject.toml; `acme` names a config table for type checking only);
never a role (smtpd, scheduler, delivery...), which drive protocol cores over these streams.
"""
