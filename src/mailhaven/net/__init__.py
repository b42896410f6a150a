"""Networking we own: TLS contexts and certificates (self-signed, ACME), DNS, client names, and
the asyncio driver of the SMTP client core.

In: sockets, names, certificates. Out: streams, answers, contexts. May import proto and config;
never a role (smtpd, scheduler, delivery...).
"""
