"""Sans-I/O protocol cores and their vocabulary: SMTP server and client, POP3, the milter
client, SASL, replies, addresses, message bodies and the envelope record every role exchanges.

Bytes in, events and replies out: nothing here does I/O (no sockets, asyncio, files or clocks),
and nothing imports mailhaven code outside `proto` (import-linter checks both).
"""
