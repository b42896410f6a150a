"""Debian's postfix-policyd-spf-python, with its DNS pointed at the bench's loopback server.

    /usr/bin/python3 bench/policyd_spf_peer.py DNS_PORT CONFIG_FILE

policyd-spf has no resolver setting: pyspf asks pydns (Debian's python3 has no dnspython),
whose servers come from /etc/resolv.conf and whose port is fixed at 53. This sets pydns's
defaults to 127.0.0.1:DNS_PORT, then runs policyd-spf's own `main()` unchanged; Postfix's
spawn(8) starts it (master.cf) and talks to it on stdin/stdout as usual.
"""

import sys

import DNS  # pydns: the resolver pyspf uses on Debian
import spf  # noqa: F401 - imported for its DiscoverNameServers() side effect, undone below

port, config = int(sys.argv[1]), sys.argv[2]
DNS.defaults["server"] = ["127.0.0.1"]
DNS.defaults["port"] = port

from spf_engine.policyd_spf import main  # noqa: E402 - after the resolver is set

sys.argv = ["policyd-spf", config]
sys.exit(main())
