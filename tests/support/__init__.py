"""Test support shared across the suite: import as `tests.support.<module>`.

pyproject sets `pythonpath = ["."]` and importlib import mode, so `tests` resolves from the
project root. `dns_server` is the loopback authoritative DNS server (UDP and TCP).
"""
