"""`python -m mailhaven`: the same as the `mailhaven` command.

Guarded: worker processes started with multiprocessing's "spawn" (large-message DKIM
verification, `checks.dkim_verify`) import the main module again, and must not run a server.
"""

import sys

from mailhaven.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
