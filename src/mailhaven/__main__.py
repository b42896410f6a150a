"""`python -m mailhaven`: the same as the `mailhaven` command."""

import sys

from mailhaven.cli.main import main

sys.exit(main())
